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
from jaxpass.kernels_pallas.sparse_matmul import triton_24
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
    why = triton_24.check_tiles(x_dtype, pw.k, cfg)
    if why is None and (pw.group_size % (4 * cfg.groups) or (pw.k // 2) % pw.group_size):
        why = (f"group_size={pw.group_size} must be a multiple of 4 * groups = {4 * cfg.groups} "
               f"and divide K/2={pw.k // 2} (one scale row per half-step)")
    return why


def default_config(m: int, pw: PackedInt424) -> Int424Config:
    bm, groups, split = triton_24.default_tiles(m, pw.k, lambda g: pw.group_size % (4 * g) == 0)
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
            tile = dict(g0=g0, m0=m0, m=m, bm=bm, groups=groups)
            if gemv:
                acc = tuple(a + sc * r for a, r in zip(acc, triton_24.row_sums(x_ref, i0, i1, v0, v1, **tile)))
            else:
                part = triton_24.dot_tiles(jnp.zeros((bm, bn), jnp.float32), x_ref, i0, i1, v0, v1,
                                           prec=prec, **tile)
                acc = acc + part * sc[None, :]
        return acc

    acc0 = (tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm)) if gemv
            else jnp.zeros((bm, bn), jnp.float32))
    acc = triton_common.prefetched_loop(steps, load, compute_step, acc0, prefetch)
    triton_common.store_block(o_ref, acc, gemv=gemv, split=split, pid_s=pid_s, m0=m0, n0=n0,
                              bm=bm, bn=bn, m=m, n_ok=n_ok)


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
