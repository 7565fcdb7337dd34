"""Pallas (Triton backend) 2:4 sparse matmul for decode shapes: load sparse, compute dense.

As in Flash-LLM, the kernel reads only the compressed weight (``layout.Packed24``: two values and
one nibble of positions per group of four) and rebuilds dense tiles in registers, so the bytes
moved are those of the sparse format and the arithmetic is ordinary dense arithmetic:

* one program owns ``block_n`` output channels (rows of the N-major format) and ``block_m``
  activation rows, and walks K in steps of ``2 * groups`` groups: ``groups`` consecutive groups
  ``[c0, c0 + groups)`` and the ``groups`` paired with them half a row later (one ``meta`` tile
  holds both as low / high nibbles), so every load is a contiguous ``[block_n, groups]`` tile;
* positions select each value into one of four dense ``[block_n, groups]`` tiles ``w_j`` (the
  weight at ``k = 4g + j``); the activation arrives re-arranged as ``x4[j, m, g] = x[m, 4g + j]``
  (a tiny XLA transpose of the activation), so ``y += sum_j x4[j] @ w_j^T``;
* ``block_m < 16``: each row is a multiply and row-reduce on the CUDA cores (decode, M = 1),
  gathering the activation at each kept value's position (two selects) rather than building
  the four dense tiles; ``block_m >= 16``: four tensor-core dots per half-step;
* ``split_k > 1`` splits the K steps over more programs (decode is latency-bound: more loads in
  flight); f32 partials ``[split_k, M, N]`` are summed by XLA.
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
from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    block_m: int = 1
    block_n: int = 32
    groups: int = 64          # groups of 4 per half-step (a step covers 8 * groups of K)
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1          # K splits (more programs in flight); f32 partials summed by XLA


def check_config(x_shape, x_dtype, pw: Packed24, cfg: SparseConfig) -> str | None:
    """Why ``cfg`` cannot run this problem (a message), or None."""
    if not triton_common.is_pow2(cfg.block_n) or cfg.block_n < 16:
        return f"block_n={cfg.block_n} must be a power of two >= 16"
    if not triton_common.is_pow2(cfg.groups) or cfg.groups < 16:
        return f"groups={cfg.groups} must be a power of two >= 16"
    if (pw.k // 8) % cfg.groups:
        return f"K={pw.k}: K/8={pw.k // 8} is not a multiple of groups={cfg.groups}"
    if cfg.split_k < 1 or (pw.k // 8 // cfg.groups) % cfg.split_k:
        return (f"split_k={cfg.split_k} does not divide the {pw.k // 8 // cfg.groups} K steps "
                f"(K={pw.k}, groups={cfg.groups})")
    if not triton_common.is_pow2(cfg.block_m) or cfg.block_m > 64 or 8 < cfg.block_m < 16:
        return f"block_m={cfg.block_m}: a power of two <= 8 (row-reduce) or 16..64 (dots)"
    if jnp.dtype(x_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"x dtype {x_dtype} is not bf16/f16/f32"
    return None


def default_config(m: int, k: int) -> SparseConfig:
    bm = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else (8 if m <= 8 else 16)))
    groups = 64
    while groups > 16 and (k // 8) % groups:
        groups //= 2
    steps = k // 8 // groups
    split = next((s for s in (4, 2) if steps % s == 0), 1)
    # The best M=1 and M=16 configs of the H100 sweep in docs/sparsity.md.
    return SparseConfig(block_m=bm, block_n=32, groups=groups, num_warps=4, num_stages=3, split_k=split)


def _kernel(x_ref, v0_ref, v1_ref, meta_ref, o_ref, *, m, n, k, bm, bn, groups, steps, split, x_dtype):
    pid_n, pid_m = pl.program_id(0), pl.program_id(1)
    pid_s = pl.program_id(2) if split > 1 else 0
    n0, m0 = pid_n * bn, pid_m * bm
    half = k // 8
    n_ok = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)) < n
    tile_mask = jnp.broadcast_to(n_ok[:, None], (bn, groups))
    gemv = bm < 16
    prec = lax.Precision.HIGHEST if x_dtype == jnp.float32 else None
    compute = jnp.float32 if gemv else x_dtype

    def load_half(meta, shift, g0):
        nib = (meta >> shift) & 0xF
        v0 = plgpu.load(v0_ref.at[pl.ds(n0, bn), pl.ds(g0, groups)], mask=tile_mask, other=0).astype(compute)
        v1 = plgpu.load(v1_ref.at[pl.ds(n0, bn), pl.ds(g0, groups)], mask=tile_mask, other=0).astype(compute)
        return nib & 3, nib >> 2, v0, v1

    def body(s, acc):
        c0 = (pid_s * steps + s) * groups
        meta = plgpu.load(meta_ref.at[pl.ds(n0, bn), pl.ds(c0, groups)], mask=tile_mask,
                          other=0).astype(jnp.int32)
        for h in range(2):
            g0 = c0 + h * half
            i0, i1, v0, v1 = load_half(meta, 4 * h, g0)
            if gemv:
                # Gather, per kept value, the activation at its position (i0 < i1, so i0 is in
                # 0..2 and i1 in 1..3): two selects each, then one multiply-add per value.
                new = []
                for r in range(bm):
                    row_ok = jnp.broadcast_to(m0 + r < m, (groups,))
                    xs = [plgpu.load(x_ref.at[jnp.int32(j), m0 + r, pl.ds(g0, groups)], mask=row_ok,
                                     other=0).astype(jnp.float32)[None, :] for j in range(4)]
                    xg0 = jnp.where(i0 == 0, xs[0], jnp.where(i0 == 1, xs[1], xs[2]))
                    xg1 = jnp.where(i1 == 3, xs[3], jnp.where(i1 == 2, xs[2], xs[1]))
                    new.append(acc[r] + jnp.sum(v0 * xg0 + v1 * xg1, axis=1))
                acc = tuple(new)
            else:
                # Dense tiles w_j (the weight at k = 4g + j) and four tensor-core dots.
                zero = jnp.zeros_like(v0)
                m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
                for j in range(4):
                    w = jnp.where(i0 == j, v0, zero) + jnp.where(i1 == j, v1, zero)
                    xj = plgpu.load(x_ref.at[jnp.int32(j), pl.ds(m0, bm), pl.ds(g0, groups)],
                                    mask=jnp.broadcast_to(m_ok, (bm, groups)), other=0)
                    acc = acc + lax.dot_general(xj, w, (((1,), (1,)), ((), ())), precision=prec,
                                                preferred_element_type=jnp.float32)
        return acc

    def store(row, sl, val, mask):
        if split > 1:
            plgpu.store(o_ref.at[pid_s, row, sl], val, mask=mask)
        else:
            plgpu.store(o_ref.at[row, sl], val.astype(o_ref.dtype), mask=mask)

    if gemv:
        acc = lax.fori_loop(0, steps, body, tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm)))
        for r in range(bm):
            store(m0 + r, pl.ds(n0, bn), acc[r], n_ok & (m0 + r < m))
    else:
        acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
        m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
        store(pl.ds(m0, bm), pl.ds(n0, bn), acc, m_ok & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def sparse_matmul_triton(x, pw: Packed24, *, config: SparseConfig | None = None, interpret: bool = False):
    """``x[..., K] @ W`` for a 2:4 ``Packed24`` weight with the Pallas Triton kernel."""
    cfg = config or default_config(int(x.size // x.shape[-1]), pw.k)
    why = check_config(x.shape, x.dtype, pw, cfg)
    if why:
        raise ValueError(f"sparse_matmul_triton: {why}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    x4 = x2.reshape(m, pw.k // 4, 4).transpose(2, 0, 1)          # [4, M, K/4]
    split = cfg.split_k
    steps = pw.k // 8 // cfg.groups // split
    kernel = functools.partial(_kernel, m=m, n=pw.n, k=pw.k, bm=cfg.block_m, bn=cfg.block_n,
                               groups=cfg.groups, steps=steps, split=split, x_dtype=x.dtype)
    out = triton_common.split_k_call(
        kernel, (x4, pw.v0, pw.v1, pw.meta),
        grid=(pl.cdiv(pw.n, cfg.block_n), pl.cdiv(m, cfg.block_m)), split=split, m=m, n=pw.n,
        out_dtype=x.dtype, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        name="jaxpass_sparse24_matmul", interpret=interpret)
    return out.reshape(*lead, pw.n)
