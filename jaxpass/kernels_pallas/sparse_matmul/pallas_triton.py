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
from jaxpass.kernels_pallas.sparse_matmul import triton_24
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
    return triton_24.check_tiles(x_dtype, pw.k, cfg)


def default_config(m: int, k: int) -> SparseConfig:
    # The best M=1 and M=16 configs of the H100 sweep in docs/sparsity.md.
    bm, groups, split = triton_24.default_tiles(m, k)
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
            tile = dict(g0=g0, m0=m0, m=m, bm=bm, groups=groups)
            if gemv:
                acc = tuple(a + r for a, r in zip(acc, triton_24.row_sums(x_ref, i0, i1, v0, v1, **tile)))
            else:
                acc = triton_24.dot_tiles(acc, x_ref, i0, i1, v0, v1, prec=prec, **tile)
        return acc

    acc0 = (tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm)) if gemv
            else jnp.zeros((bm, bn), jnp.float32))
    acc = lax.fori_loop(0, steps, body, acc0)
    triton_common.store_block(o_ref, acc, gemv=gemv, split=split, pid_s=pid_s, m0=m0, n0=n0,
                              bm=bm, bn=bn, m=m, n_ok=n_ok)


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
