"""Pieces shared by the Pallas Triton weight-only kernels (``pallas_triton``, ``pallas_triton_gemv``).

* Integer codes become floats without int->float instructions (slow on GPUs): a code ``c``
  OR-ed into the mantissa of f32 2**23 (bits ``F32_MAGIC``) *is* the f32 ``2**23 + c``, one
  subtraction from the value; for bf16, OR-ed into 128.0 (bits ``BF16_MAGIC``) it is ``128 + c``.
* Activations travel as u32 words holding two 16-bit values (a free bitcast outside the kernel),
  so int4 kernels read them contiguously and split them with two integer ops.
* The decode kernels are bound by memory latency: ``prefetched_loop`` issues the loads of step
  ``i + 1`` before the arithmetic of step ``i``, doubling the bytes each program has in flight.
* Split-K (``split_k_call``): ``split`` programs per output tile each write an f32 partial; the
  partials are summed outside the kernel. Used by these kernels and the sparse-matmul ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32_MAGIC = 0x4B000000  # f32 bits of 2**23: OR-ing an integer c < 2**23 into it gives 2**23 + c
BF16_MAGIC = 0x4300     # bf16 bits of 128.0: OR-ing c < 128 into it gives 128 + c


def int8_as_f32(u32_bytes):
    """u32 holding a two's-complement byte (low 8 bits) -> the exact f32 of that int8 value."""
    f = lax.bitcast_convert_type((u32_bytes & 0xFF) ^ (F32_MAGIC | 0x80), jnp.float32)
    return f - jnp.float32(2.0 ** 23 + 128.0)  # 2**23 + (q + 128) - (2**23 + 128)


def code_as_f32(u32_code, offset: float):
    """u32 holding a small unsigned code (< 2**23) -> the exact f32 ``code - offset``."""
    return lax.bitcast_convert_type(u32_code | F32_MAGIC, jnp.float32) - jnp.float32(2.0 ** 23 + offset)


def split_pairs(xw, x_dtype):
    """u32 words holding two 16-bit activations (even k low) -> (even, odd) in ``x_dtype``."""
    lo = lax.bitcast_convert_type((xw & 0xFFFF).astype(jnp.uint16), x_dtype)
    hi = lax.bitcast_convert_type((xw >> 16).astype(jnp.uint16), x_dtype)
    return lo, hi


def prefetched_loop(steps, load, compute, acc0, prefetch: bool):
    """``acc = compute(load(i), acc)`` for i < steps; with ``prefetch``, load i + 1 before
    computing i (the last step re-loads itself rather than reading past the end)."""
    if not prefetch:
        return lax.fori_loop(0, steps, lambda i, a: compute(load(i), a), acc0)

    def body(i, carry):
        acc, data = carry
        nxt = load(jnp.minimum(i + 1, steps - 1))
        return compute(data, acc), nxt

    acc, _ = lax.fori_loop(0, steps, body, (acc0, load(0)))
    return acc


def is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def row_count(x_shape) -> int:
    """M of an ``x[..., K]`` activation: the product of its leading dimensions."""
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    return m


def rows_of(x, pw, why: str | None):
    """Checks ``x[..., K]`` against the weight (and a config check's verdict ``why``) and
    returns ``(leading shape, x as [M, K], M)``; raises ValueError naming the problem."""
    if x.shape[-1] != pw.k:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's K={pw.k}")
    if why:
        raise ValueError(why)
    x2 = x.reshape(-1, pw.k)
    return x.shape[:-1], x2, x2.shape[0]


def split_k_call(kernel, args, *, grid, split: int, m: int, n: int, out_dtype, num_warps: int,
                 num_stages: int = 1, name: str, interpret: bool):
    """``pallas_call`` of a ``[M, N]`` matmul kernel over ``grid``; with ``split > 1`` a last grid
    axis of K splits writes f32 partials ``[split, M, N]``, summed here. Returns ``[M, N]`` in
    ``out_dtype``."""
    if split > 1:
        grid, out_shape = tuple(grid) + (split,), jax.ShapeDtypeStruct((split, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=tuple(grid),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return out.sum(axis=0).astype(out_dtype) if split > 1 else out


def store_block(o_ref, acc, *, gemv, split, pid_s, m0, n0, bm, bn, m, n_ok):
    """Writes a program's accumulator: per row (row-reduce form) or as one tile; an f32 partial
    per K split, else the output in its dtype."""
    def store(row, val, mask):
        if split > 1:
            plgpu.store(o_ref.at[pid_s, row, pl.ds(n0, bn)], val, mask=mask)
        else:
            plgpu.store(o_ref.at[row, pl.ds(n0, bn)], val.astype(o_ref.dtype), mask=mask)

    if gemv:
        for r in range(bm):
            store(jnp.asarray(m0 + r, jnp.int32), acc[r], n_ok & (m0 + r < m))
    else:
        m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
        store(pl.ds(m0, bm), acc, m_ok & n_ok[None, :])
