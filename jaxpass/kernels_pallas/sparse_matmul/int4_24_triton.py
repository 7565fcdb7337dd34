"""Pallas (Triton backend) int4 + 2:4 matmul for decode shapes: load sparse and quantized,
compute dense.

The 2:4 kernel's scheme (``pallas_triton.py``) on the int4 + 2:4 format
(``int4_24_layout.PackedInt424``): per K half-step a program loads one ``[block_n, groups]`` tile
of code bytes (both kept codes of a group) and the matching positions nibble, decodes the codes
to exact floats with ``triton_common.code_as_f32`` (no int->float instructions), places them
with the positions, and applies the group scale once per half-step: a half-step's
``4 * groups`` rows lie in one scale group (``group_size`` a multiple of ``4 * groups``), so
``y += s * sum(q * x)`` with one ``[block_n]`` scale row.

* ``block_m < 16``: per row, gather the activation at each kept code's position (two selects)
  and multiply-add on the CUDA cores (decode, M = 1);
* ``block_m >= 16``: four dense ``[block_n, groups]`` tiles of codes (exact in bf16) and four
  tensor-core dots per half-step, scaled after the dots;
* ``split_k > 1``: f32 partials over K splits, summed by XLA.

The weight moves 0.375 bytes per weight plus scales against 2 for dense bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpass.kernels_pallas.quantized_matmul import triton_common
from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import PackedInt424


@dataclasses.dataclass(frozen=True)
class Int424Config:
    block_m: int = 1
    block_n: int = 32
    groups: int = 16          # groups of 4 per half-step (a step covers 8 * groups of K)
    num_warps: int = 4
    num_stages: int = 2       # >= 2: prefetch the next step's codes, positions and scales
    split_k: int = 1


def check_config(x_shape, x_dtype, pw: PackedInt424, cfg: Int424Config) -> str | None:
    """Why ``cfg`` cannot run this problem (a message), or None."""
    if not triton_common.is_pow2(cfg.block_n) or cfg.block_n < 16:
        return f"block_n={cfg.block_n} must be a power of two >= 16"
    if not triton_common.is_pow2(cfg.groups) or cfg.groups < 16:
        return f"groups={cfg.groups} must be a power of two >= 16"
    if (pw.k // 8) % cfg.groups:
        return f"K={pw.k}: K/8={pw.k // 8} is not a multiple of groups={cfg.groups}"
    if pw.group_size % (4 * cfg.groups) or (pw.k // 2) % pw.group_size:
        return (f"group_size={pw.group_size} must be a multiple of 4 * groups = {4 * cfg.groups} and "
                f"divide K/2={pw.k // 2} (one scale row per half-step)")
    steps = pw.k // 8 // cfg.groups
    if cfg.split_k < 1 or steps % cfg.split_k:
        return f"split_k={cfg.split_k} does not divide the {steps} K steps (K={pw.k}, groups={cfg.groups})"
    if not triton_common.is_pow2(cfg.block_m) or cfg.block_m > 64 or 8 < cfg.block_m < 16:
        return f"block_m={cfg.block_m}: a power of two <= 8 (row-reduce) or 16..64 (dots)"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"x dtype {jnp.dtype(x_dtype).name} is not bf16/f16/f32"
    return None


def default_config(m: int, pw: PackedInt424) -> Int424Config:
    bm = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else (8 if m <= 8 else 16)))
    groups = 64
    while groups > 16 and ((pw.k // 8) % groups or pw.group_size % (4 * groups)):
        groups //= 2
    steps = pw.k // 8 // groups
    split = next((s for s in (4, 2) if steps % s == 0), 1)
    return Int424Config(block_m=bm, block_n=32, groups=groups, num_warps=4, num_stages=2, split_k=split)


def _kernel(x_ref, codes_ref, meta_ref, s_ref, o_ref, *, m, n, k, gsize, bm, bn, groups, steps,
            split, prefetch, x_dtype):
    pid_n, pid_m = pl.program_id(0), pl.program_id(1)
    pid_s = pl.program_id(2) if split > 1 else 0
    n0, m0 = pid_n * bn, pid_m * bm
    half = k // 8
    n_ok = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)) < n
    tile_mask = jnp.broadcast_to(n_ok[:, None], (bn, groups))
    gemv = bm < 16
    prec = lax.Precision.HIGHEST if x_dtype == jnp.float32 else None
    compute = jnp.float32 if gemv else x_dtype

    def load(s):
        c0 = (pid_s * steps + s) * groups
        meta = plgpu.load(meta_ref.at[pl.ds(n0, bn), pl.ds(c0, groups)], mask=tile_mask, other=0)
        halves = []
        for h in range(2):
            g0 = c0 + h * half
            codes = plgpu.load(codes_ref.at[pl.ds(n0, bn), pl.ds(g0, groups)], mask=tile_mask, other=0x88)
            sc = plgpu.load(s_ref.at[jnp.asarray((4 * g0) // gsize, jnp.int32), pl.ds(n0, bn)], mask=n_ok, other=0)
            halves.append((g0, codes, sc))
        return meta, tuple(halves)

    def compute_step(data, acc):
        meta, halves = data
        meta = meta.astype(jnp.int32)
        for h, (g0, codes, sc) in enumerate(halves):
            nib = (meta >> (4 * h)) & 0xF
            i0, i1 = nib & 3, nib >> 2
            cw = codes.astype(jnp.uint32)
            v0 = triton_common.code_as_f32(cw & 0xF, 8.0).astype(compute)
            v1 = triton_common.code_as_f32(cw >> 4, 8.0).astype(compute)
            sc = sc.astype(jnp.float32)
            if gemv:
                new = []
                for r in range(bm):
                    row_ok = jnp.broadcast_to(m0 + r < m, (groups,))
                    xs = [plgpu.load(x_ref.at[jnp.int32(j), m0 + r, pl.ds(g0, groups)], mask=row_ok,
                                     other=0).astype(jnp.float32)[None, :] for j in range(4)]
                    xg0 = jnp.where(i0 == 0, xs[0], jnp.where(i0 == 1, xs[1], xs[2]))
                    xg1 = jnp.where(i1 == 3, xs[3], jnp.where(i1 == 2, xs[2], xs[1]))
                    new.append(acc[r] + sc * jnp.sum(v0 * xg0 + v1 * xg1, axis=1))
                acc = tuple(new)
            else:
                zero = jnp.zeros_like(v0)
                m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
                part = jnp.zeros((bm, bn), jnp.float32)
                for j in range(4):
                    w = jnp.where(i0 == j, v0, zero) + jnp.where(i1 == j, v1, zero)
                    xj = plgpu.load(x_ref.at[jnp.int32(j), pl.ds(m0, bm), pl.ds(g0, groups)],
                                    mask=jnp.broadcast_to(m_ok, (bm, groups)), other=0)
                    part = part + lax.dot_general(xj, w, (((1,), (1,)), ((), ())), precision=prec,
                                                  preferred_element_type=jnp.float32)
                acc = acc + part * sc[None, :]
        return acc

    def store(row, sl, val, mask):
        if split > 1:
            plgpu.store(o_ref.at[pid_s, row, sl], val, mask=mask)
        else:
            plgpu.store(o_ref.at[row, sl], val.astype(o_ref.dtype), mask=mask)

    if gemv:
        acc0 = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm))
        acc = triton_common.prefetched_loop(steps, load, compute_step, acc0, prefetch)
        for r in range(bm):
            store(jnp.asarray(m0 + r, jnp.int32), pl.ds(n0, bn), acc[r], n_ok & (m0 + r < m))
    else:
        acc = triton_common.prefetched_loop(steps, load, compute_step, jnp.zeros((bm, bn), jnp.float32),
                                            prefetch)
        m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
        store(pl.ds(m0, bm), pl.ds(n0, bn), acc, m_ok & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def int4_24_matmul_triton(x, pw: PackedInt424, *, config: Int424Config | None = None,
                          interpret: bool = False):
    """``x[..., K] @ W`` for a ``PackedInt424`` weight with the Pallas Triton kernel (y in x's
    dtype, f32 accumulation). Raises ValueError when :func:`check_config` rejects the problem."""
    cfg = config or default_config(triton_common.row_count(x.shape), pw)
    why = check_config(x.shape, x.dtype, pw, cfg)
    lead, x2, m = triton_common.rows_of(x, pw, why and f"int4_24_matmul_triton: config {cfg}: {why}")
    x4 = x2.reshape(m, pw.k // 4, 4).transpose(2, 0, 1)          # [4, M, K/4]
    split = cfg.split_k
    steps = pw.k // 8 // cfg.groups // split
    kernel = functools.partial(_kernel, m=m, n=pw.n, k=pw.k, gsize=pw.group_size, bm=cfg.block_m,
                               bn=cfg.block_n, groups=cfg.groups, steps=steps, split=split,
                               prefetch=cfg.num_stages >= 2, x_dtype=x.dtype)
    out = triton_common.split_k_call(
        kernel, (x4, pw.codes, pw.meta, pw.scales),
        grid=(pl.cdiv(pw.n, cfg.block_n), pl.cdiv(m, cfg.block_m)), split=split, m=m, n=pw.n,
        out_dtype=x.dtype, num_warps=cfg.num_warps, name="jaxpass_int4_24_matmul",
        interpret=interpret)
    return out.reshape(*lead, pw.n)
