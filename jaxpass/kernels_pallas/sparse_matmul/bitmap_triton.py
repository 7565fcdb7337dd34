"""Pallas (Triton backend) unstructured-sparse matmul for decode shapes on the bitmap format.

Load sparse, compute dense (Flash-LLM): the kernel reads only the bitmap words, the compacted
nonzeros and one offset per block (``bitmap_layout.PackedBitmap``) and rebuilds the dense weight
tile in registers:

* one program owns ``block_n`` output channels and ``block_m`` activation rows and walks K one
  offset block at a time (``block_words`` bitmap words = ``32 * block_words`` rows per step);
* per step it loads the ``[block_n, block_words]`` words and the ``[block_n]`` block offsets;
  the index (into the flat value array) of the first nonzero of each word is the block offset
  plus the exclusive prefix (a cumsum along the word axis) of the word popcounts;
* for bit ``i`` = 0..31 it gathers, where the bit is set, the value at that index into the dense
  tile ``w_i[n, j] = W[32 j + i, n]`` and advances the index by the bit (so the in-word rank
  ``popcount(word & ((1 << i) - 1))`` is a running sum, one add per bit); the activation arrives
  re-arranged as ``x32[i, m, j] = x[m, 32 j + i]`` (a small XLA transpose of x), so the tile
  meets a contiguous activation row;
* ``block_m <= 8``: elementwise multiply-adds into a ``[block_n, block_words]`` f32 tile per row,
  reduced once after the K loop (the word-GEMV scheme); ``block_m >= 16``: tensor-core dots
  ``x32[i] @ w_i^T`` (needs ``block_words >= 16``);
* ``split_k > 1`` spreads the blocks over more programs (decode is latency-bound); f32 partials
  ``[split_k, M, N]`` are summed by XLA. ``num_stages >= 2`` prefetches the next step's words.

The gathers are the cost of the format: each stored value is loaded once, but through an index
rather than as part of a vector load. Whether that beats dense bf16 at 70% sparsity is what
``scripts/bench_sparse_formats.py`` measures.
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
from jaxpass.kernels_pallas.sparse_matmul.bitmap_layout import PackedBitmap

MAX_GEMV_ROWS = 8


@dataclasses.dataclass(frozen=True)
class BitmapConfig:
    block_m: int = 1
    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 2       # >= 2: prefetch the next block's words and offsets
    split_k: int = 1          # K splits (more programs in flight); f32 partials summed by XLA


def check_config(x_shape, x_dtype, pb: PackedBitmap, cfg: BitmapConfig) -> str | None:
    """Why ``cfg`` cannot run this problem (a message), or None."""
    if not triton_common.is_pow2(cfg.block_n) or cfg.block_n < 16:
        return f"block_n={cfg.block_n} must be a power of two >= 16"
    blocks = pb.k // (32 * pb.block_words)
    if cfg.split_k < 1 or blocks % cfg.split_k:
        return f"split_k={cfg.split_k} does not divide the {blocks} K blocks (K={pb.k}, block_words={pb.block_words})"
    if not triton_common.is_pow2(cfg.block_m) or cfg.block_m > 64 or MAX_GEMV_ROWS < cfg.block_m < 16:
        return f"block_m={cfg.block_m}: a power of two <= {MAX_GEMV_ROWS} (row GEMV) or 16..64 (dots)"
    if cfg.block_m >= 16 and pb.block_words < 16:
        return f"block_m={cfg.block_m} uses tensor-core dots, which need block_words >= 16 (got {pb.block_words})"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"x dtype {jnp.dtype(x_dtype).name} is not bf16/f16/f32"
    return None


def default_config(m: int, pb: PackedBitmap) -> BitmapConfig:
    bm = 1
    while bm < min(m, MAX_GEMV_ROWS):
        bm *= 2
    if m > MAX_GEMV_ROWS:
        bm = 16
    blocks = pb.k // (32 * pb.block_words)
    split = next((s for s in (4, 2) if blocks % s == 0 and blocks // s >= 2), 1)
    return BitmapConfig(block_m=bm, block_n=32, num_warps=4, num_stages=2, split_k=split)


def _kernel(x_ref, words_ref, values_ref, off_ref, o_ref, *, m, n, bm, bn, bw, steps, split,
            prefetch, x_dtype):
    pid_n, pid_m = pl.program_id(0), pl.program_id(1)
    pid_s = pl.program_id(2) if split > 1 else 0
    n0, m0 = pid_n * bn, pid_m * bm
    ch = n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    n_ok = ch < n
    tile_ok = jnp.broadcast_to(n_ok[:, None], (bn, bw))
    gemv = bm < 16
    prec = lax.Precision.HIGHEST if x_dtype == jnp.float32 else None

    def load(s):
        b = jnp.asarray(pid_s * steps + s, jnp.int32)
        words = plgpu.load(words_ref.at[pl.ds(n0, bn), pl.ds(b * bw, bw)], mask=tile_ok, other=0)
        off = plgpu.load(off_ref.at[pl.ds(n0, bn), b], mask=n_ok, other=0)
        return b, lax.bitcast_convert_type(words, jnp.int32), off

    def compute(data, acc):
        b, words, off = data
        cnt = lax.population_count(words)
        idx = off[:, None] + lax.cumsum(cnt, axis=1) - cnt      # first nonzero of each word
        m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
        for i in range(32):
            bit = (words >> i) & 1              # bit 31: the sign bit, still 0 or 1
            present = (bit != 0) & tile_ok
            v = plgpu.load(values_ref.at[idx], mask=present, other=0)
            if gemv:
                v = v.astype(jnp.float32)
                new = []
                for r in range(bm):
                    r_ok = jnp.broadcast_to(m0 + r < m, (bw,))
                    xr = plgpu.load(x_ref.at[jnp.int32(i), m0 + r, pl.ds(b * bw, bw)], mask=r_ok, other=0)
                    new.append(acc[r] + v * xr.astype(jnp.float32)[None, :])
                acc = tuple(new)
            else:
                xi = plgpu.load(x_ref.at[jnp.int32(i), pl.ds(m0, bm), pl.ds(b * bw, bw)],
                                mask=jnp.broadcast_to(m_ok, (bm, bw)), other=0)
                acc = acc + lax.dot_general(xi, v.astype(x_dtype), (((1,), (1,)), ((), ())),
                                            precision=prec, preferred_element_type=jnp.float32)
            idx = idx + bit
        return acc

    if gemv:
        acc0 = tuple(jnp.zeros((bn, bw), jnp.float32) for _ in range(bm))
        acc = triton_common.prefetched_loop(steps, load, compute, acc0, prefetch)
        acc = tuple(jnp.sum(a, axis=1) for a in acc)
    else:
        acc = triton_common.prefetched_loop(steps, load, compute, jnp.zeros((bm, bn), jnp.float32), prefetch)
    triton_common.store_block(o_ref, acc, gemv=gemv, split=split, pid_s=pid_s, m0=m0, n0=n0, bm=bm,
                              bn=bn, m=m, n_ok=n_ok)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def bitmap_matmul_triton(x, pb: PackedBitmap, *, config: BitmapConfig | None = None, interpret: bool = False):
    """``x[..., K] @ W`` for a ``PackedBitmap`` weight with the Pallas Triton kernel (y in x's
    dtype, f32 accumulation). Raises ValueError when :func:`check_config` rejects the problem."""
    cfg = config or default_config(triton_common.row_count(x.shape), pb)
    why = check_config(x.shape, x.dtype, pb, cfg)
    lead, x2, m = triton_common.rows_of(x, pb, why and f"bitmap_matmul_triton: config {cfg}: {why}")
    kw = pb.k // 32
    x32 = x2.reshape(m, kw, 32).transpose(2, 0, 1)                  # [32, M, K/32]
    split = cfg.split_k
    steps = kw // pb.block_words // split
    kernel = functools.partial(_kernel, m=m, n=pb.n, bm=cfg.block_m, bn=cfg.block_n, bw=pb.block_words,
                               steps=steps, split=split, prefetch=cfg.num_stages >= 2, x_dtype=x.dtype)
    out = triton_common.split_k_call(
        kernel, (x32, pb.words, pb.values, pb.offsets),
        grid=(pl.cdiv(pb.n, cfg.block_n), pl.cdiv(m, cfg.block_m)), split=split, m=m, n=pb.n,
        out_dtype=x.dtype, num_warps=cfg.num_warps, name="jaxpass_bitmap_matmul",
        interpret=interpret)
    return out.reshape(*lead, pb.n)
