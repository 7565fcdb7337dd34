"""Pallas (Triton backend) kernels: weight-only int4/int8 matmul for decode shapes, and W8A8.

Why Triton and not Mosaic GPU: see docs/kernels.md. In short, these kernels are bound by reading
the weight once; their cost is in unpacking nibbles and feeding small (M <= 64) dots, which Triton
lays out for us (mma with M padded to 16), while Mosaic GPU wants warpgroup tiles of M >= 64 and
explicit layouts for the unpack. Triton kernels also run in Pallas' CPU interpreter, so every
variant is tested in CI.

Weight-only kernel (``quantized_matmul_triton``), for one program = (column block, row block, K split):

* The weight is N-major (``layout.py``): the program streams ``block_n`` contiguous rows of
  ``data``, ``block_k`` bytes per step, split into group-aligned sub-blocks.
* Dequantization without int->float conversion instructions (slow on GPUs): a 4-bit code ``c``
  OR-ed into the mantissa of bf16 128.0 (bits 0x4300) *is* the bf16 number ``128 + c``; an int8
  code XOR-ed into the mantissa of f32 2**23 is ``2**23 + 128 + q``, one subtraction from ``q``.
* Offsets (code bias, the 128 of the bf16 trick, zero points) and scales are not applied per
  element: per group, ``x @ ((c - off) * s) = s * (x @ c - off * sum(x))``, so the inner loop is
  unpack, dot, and one ``[block_m, block_n]`` multiply-add per group.
* Two variants: ``block_m >= 16`` uses the tensor-core dot (Triton's minimum is 16 rows);
  ``block_m < 16`` (at most 8 rows, decode) multiplies and row-reduces on the CUDA cores, with a
  one-step manual prefetch of the next K step when ``num_stages >= 2``.
* Split-K writes f32 partials ``[split_k, M, N]``; XLA adds them (one small fused reduction).
  More programs in flight is what these latency-bound kernels need (docs/bench_matmul.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpass.kernels_pallas.quantized_matmul import layout, triton_common
from jaxpass.kernels_pallas.quantized_matmul.config import Int8Config, TritonConfig
from jaxpass.kernels_pallas.quantized_matmul.layout import PackedWeight

def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def sub_block(pw: PackedWeight, block_k: int) -> int:
    """Stored columns per group-aligned sub-block of a ``block_k`` step (0 if none fits Triton)."""
    if pw.per_channel:
        return block_k
    cols_per_group = pw.group_size // 2 if pw.bits == 4 else pw.group_size
    sub = 1
    while sub * 2 <= block_k and cols_per_group % (sub * 2) == 0:
        sub *= 2
    return sub if sub >= 16 else 0


def check_config(x_shape, x_dtype, pw: PackedWeight, cfg: TritonConfig) -> str | None:
    """Why ``cfg`` cannot run this problem (a message), or None if it can."""
    for name in ("block_n", "block_k"):
        v = getattr(cfg, name)
        if not _is_pow2(v) or v < 16:
            return f"{name}={v} must be a power of two >= 16"
    if not _is_pow2(cfg.block_m) or cfg.block_m > 128:
        return f"block_m={cfg.block_m} must be a power of two <= 128 (< 16: GEMV variant)"
    if cfg.block_m < 16 and cfg.block_m > 8:
        return f"block_m={cfg.block_m}: the GEMV variant takes at most 8 rows"
    if cfg.split_k < 1:
        return f"split_k={cfg.split_k} must be >= 1"
    if x_dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"x dtype {x_dtype} is not bf16/f16/f32"
    stored_k = pw.k // 2 if pw.bits == 4 else pw.k
    if cfg.block_k > stored_k:
        return f"block_k={cfg.block_k} is longer than the {stored_k} stored columns of K={pw.k}"
    if sub_block(pw, cfg.block_k) == 0:
        return (f"group_size={pw.group_size} has no power-of-two sub-block of >= 16 stored "
                f"columns within block_k={cfg.block_k}")
    return None


def _dequant_int4(w_u8, x_dtype):
    """Two ``[bn, sub]`` tiles of exact values (low nibbles = even k, high = odd k) and their offset.

    Returns (lo, hi, extra_offset): the tile values are ``code + extra_offset``.
    """
    if x_dtype == jnp.bfloat16:
        w16 = w_u8.astype(jnp.uint16)
        lo = lax.bitcast_convert_type((w16 & 0xF) | triton_common.BF16_MAGIC, jnp.bfloat16)
        hi = lax.bitcast_convert_type((w16 >> 4) | triton_common.BF16_MAGIC, jnp.bfloat16)
        return lo, hi, 128.0
    lo, hi = _codes_f32_int4(w_u8)
    return lo.astype(x_dtype), hi.astype(x_dtype), 0.0


def _dequant_int8(w_i8, x_dtype):
    """The ``[bn, sub]`` tile of exact int8 values q (|q| <= 128 is exact in bf16)."""
    u = lax.bitcast_convert_type(w_i8, jnp.uint8).astype(jnp.uint32)
    return triton_common.int8_as_f32(u).astype(x_dtype)


def _codes_f32_int4(w_u8):
    """Exact f32 codes (low nibble, high nibble) of a uint8 tile, without int->float instructions."""
    w32 = w_u8.astype(jnp.uint32)
    return triton_common.code_as_f32(w32 & 0xF, 0.0), triton_common.code_as_f32(w32 >> 4, 0.0)


def _qmm_kernel(x_ref, w_ref, s_ref, *refs, bits, m, n, k, group_size, num_groups, bias,
                has_zeros, bm, bn, bk, sub, steps, split, mask_k, x_dtype, x_pairs, gemv,
                config_stages):
    """One (column block, row block, K split) program; see the module docstring.

    ``x_pairs``: x arrives as u32 words of (even, odd) 16-bit activations, so the int4 kernel
    reads it contiguously and splits it with two integer ops (int4 data holds k = 2j and 2j + 1 in
    one byte). ``gemv``: ``bm < 16`` rows, each a separate multiply-and-reduce on the CUDA cores
    (no tensor-core dot, whose 16-row minimum would waste loads and work at M = 1).
    """
    if has_zeros:
        z_ref, o_ref = refs
    else:
        (o_ref,) = refs
    pid_n, pid_m = pl.program_id(0), pl.program_id(1)
    pid_s = pl.program_id(2) if split > 1 else 0
    n0, m0 = pid_n * bn, pid_m * bm
    kp = k // 2 if bits == 4 else k
    n_ok = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)) < n
    col = lax.broadcasted_iota(jnp.int32, (1, sub), 1)
    m_idx = m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    m_ok = m_idx < m
    dn = (((1,), (1,)), ((), ()))
    # f32 activations: IEEE f32 products (Triton would otherwise use tf32).
    prec = lax.Precision.HIGHEST if x_dtype == jnp.float32 else None
    dot = functools.partial(lax.dot_general, dimension_numbers=dn, precision=prec,
                            preferred_element_type=jnp.float32)

    def load_x_dot(k_idx, c0):
        """x for all bm rows: [bm, sub] (int8) or two [bm, sub] (int4: even k, odd k)."""
        if x_pairs:
            cols = c0 + col
            mask = m_ok & (cols < kp) if mask_k else jnp.broadcast_to(m_ok, (bm, sub))
            return triton_common.split_pairs(plgpu.load(x_ref.at[m_idx, cols], mask=mask, other=0), x_dtype)
        out = []
        for kk in k_idx:
            mask = m_ok & (kk < k) if mask_k else jnp.broadcast_to(m_ok, (bm, sub))
            out.append(plgpu.load(x_ref.at[m_idx, kk], mask=mask, other=0))
        return tuple(out)

    def load_x_row(r, c0):
        """x for row m0 + r, as [1, sub] arrays (int8: one; int4: even k, odd k)."""
        row_ok = m0 + r < m
        mask = jnp.broadcast_to(row_ok, (sub,))
        if mask_k:
            mask = mask & ((c0 + col[0]) < kp)
        if x_pairs or bits == 8:
            v = plgpu.load(x_ref.at[m0 + r, pl.ds(c0, sub)], mask=mask, other=0)
            parts = triton_common.split_pairs(v, x_dtype) if x_pairs else (v,)
        else:  # f32 activations with int4: strided gathers (a test-only path)
            kk = 2 * c0 + 2 * col[0]
            parts = tuple(plgpu.load(x_ref.at[jnp.broadcast_to(m0 + r, (sub,)), kk + t],
                                     mask=mask, other=0) for t in (0, 1))
        return tuple(p.astype(jnp.float32)[None, :] for p in parts)

    def scale_offset(k0):
        g = jnp.asarray(k0 // group_size, jnp.int32)
        if mask_k:
            g = jnp.minimum(g, num_groups - 1)
        s = plgpu.load(s_ref.at[g, pl.ds(n0, bn)], mask=n_ok, other=0).astype(jnp.float32)
        z = None
        if has_zeros:
            z = plgpu.load(z_ref.at[g, pl.ds(n0, bn)], mask=n_ok, other=0).astype(jnp.float32)
        return s, z

    def load_tile(step, j):
        c0 = (pid_s * steps + step) * bk + j * sub  # first stored column of this sub-block
        wmask = n_ok[:, None]
        if mask_k:
            wmask = wmask & ((c0 + col) < kp)
        return c0, plgpu.load(w_ref.at[pl.ds(n0, bn), pl.ds(c0, sub)],
                              mask=jnp.broadcast_to(wmask, (bn, sub)), other=0)

    if gemv:
        # Loads of step i + 1 are issued before the arithmetic of step i (num_stages >= 2): the
        # kernel is bound by memory latency, and this doubles the bytes each program has in flight.
        prefetch = config_stages >= 2

        def gemv_load(step):
            out = []
            for j in range(bk // sub):
                c0, w = load_tile(step, j)
                k0 = 2 * c0 if bits == 4 else c0
                sc, z = scale_offset(k0)
                out.append((w, sc, z, tuple(load_x_row(r, c0) for r in range(bm))))
            return tuple(out)

        def gemv_compute(data, acc):
            for w, sc, z, xrows in data:
                if bits == 4:
                    tiles, off = _codes_f32_int4(w), bias
                else:
                    tiles, off = (_dequant_int8(w, jnp.float32),), 0.0
                off_v = off if z is None else z + off
                new = []
                for r in range(bm):
                    xr = xrows[r]
                    part = sum(jnp.sum(t * xv, axis=1) for t, xv in zip(tiles, xr))
                    if z is not None or off:
                        part = part - off_v * sum(jnp.sum(xv) for xv in xr)
                    new.append(acc[r] + sc * part)
                acc = tuple(new)
            return acc

        acc0 = tuple(jnp.zeros((bn,), jnp.float32) for _ in range(bm))
        acc = triton_common.prefetched_loop(steps, gemv_load, gemv_compute, acc0, prefetch)
        for r in range(bm):
            mask = n_ok & (m0 + r < m)
            if split > 1:
                plgpu.store(o_ref.at[pid_s, m0 + r, pl.ds(n0, bn)], acc[r], mask=mask)
            else:
                plgpu.store(o_ref.at[m0 + r, pl.ds(n0, bn)], acc[r].astype(o_ref.dtype),
                            mask=mask)
        return

    def body(i, acc):
        for j in range(bk // sub):
            c0, w = load_tile(i, j)
            k0 = 2 * c0 if bits == 4 else c0
            s, z = scale_offset(k0)
            if bits == 4:
                xe, xo = load_x_dot((k0 + 2 * col, k0 + 2 * col + 1), c0)
                lo, hi, extra = _dequant_int4(w, x_dtype)
                d = dot(xe, lo) + dot(xo, hi)
                xsum = (jnp.sum(xe.astype(jnp.float32), axis=1)
                        + jnp.sum(xo.astype(jnp.float32), axis=1))
            else:
                (xk,) = load_x_dot((k0 + col,), c0)
                wq = _dequant_int8(w, x_dtype)
                extra = 0.0
                d = dot(xk, wq)
                xsum = jnp.sum(xk.astype(jnp.float32), axis=1)
            off = bias + extra
            if z is not None:
                acc = acc + s[None, :] * (d - xsum[:, None] * (z + off)[None, :])
            elif off:
                acc = acc + s[None, :] * (d - off * xsum[:, None])
            else:
                acc = acc + s[None, :] * d
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    omask = m_ok & n_ok[None, :]
    if split > 1:
        plgpu.store(o_ref.at[pid_s, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=omask)
    else:
        plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype), mask=omask)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def quantized_matmul_triton(x: jax.Array, pw: PackedWeight, *, config: TritonConfig = TritonConfig(),
                            interpret: bool = False) -> jax.Array:
    """``x[..., K] @ W`` with the Pallas Triton weight-only kernel (see module docstring).

    ``config`` must pass :func:`check_config` (``api`` checks before calling); raises ValueError
    otherwise. ``config.block_m < 16`` selects the GEMV variant (rows reduced on the CUDA cores).
    """
    why = check_config(x.shape, x.dtype, pw, config)
    lead, x2, m = triton_common.rows_of(x, pw, why and f"config {config}: {why}")
    cfg = config
    kp = pw.k // 2 if pw.bits == 4 else pw.k
    total_steps = pl.cdiv(kp, cfg.block_k)
    split = max(1, min(cfg.split_k, total_steps))
    steps = pl.cdiv(total_steps, split)
    mask_k = (kp % cfg.block_k != 0) or (steps * split != total_steps)
    grid = (pl.cdiv(pw.n, cfg.block_n), pl.cdiv(m, cfg.block_m), split)
    if split == 1:
        grid = grid[:2]
        out_shape = jax.ShapeDtypeStruct((m, pw.n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((split, m, pw.n), jnp.float32)
    x_pairs = pw.bits == 4 and x.dtype.itemsize == 2
    if x_pairs:  # free in XLA: a bitcast of the same bytes
        x2 = lax.bitcast_convert_type(x2.reshape(m, kp, 2), jnp.uint32)
    kernel = functools.partial(
        _qmm_kernel, bits=pw.bits, m=m, n=pw.n, k=pw.k, group_size=pw.group_size,
        num_groups=pw.num_groups, bias=float(layout.code_bias(pw)), has_zeros=pw.zeros is not None,
        bm=cfg.block_m, bn=cfg.block_n, bk=cfg.block_k, sub=sub_block(pw, cfg.block_k),
        steps=steps, split=split, mask_k=mask_k, x_dtype=x.dtype, x_pairs=x_pairs,
        gemv=cfg.block_m < 16, config_stages=cfg.num_stages)
    args = [x2, pw.data, pw.scales] + ([pw.zeros] if pw.zeros is not None else [])
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxpass_qmm_{pw.format}",
    )(*args)
    if split > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out.reshape(*lead, pw.n)


# --------------------------------------------------------------------------- W8A8


def _int8_kernel(xq_ref, xs_ref, wq_ref, ws_ref, o_ref, *, m, n, k, bm, bn, bk, mask_k):
    pid_m, pid_n = pl.program_id(0), pl.program_id(1)
    m0, n0 = pid_m * bm, pid_n * bn
    m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)) < m
    n_ok = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)) < n
    kk = lax.broadcasted_iota(jnp.int32, (bk,), 0)

    def body(i, acc):
        k0 = i * bk
        xm, wm = m_ok[:, None], n_ok[None, :]
        if mask_k:
            xm = xm & ((k0 + kk) < k)[None, :]
            wm = wm & ((k0 + kk) < k)[:, None]
        a = plgpu.load(xq_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)],
                       mask=jnp.broadcast_to(xm, (bm, bk)), other=0)
        b = plgpu.load(wq_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)],
                       mask=jnp.broadcast_to(wm, (bk, bn)), other=0)
        return acc + lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, pl.cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.int32))
    xs = plgpu.load(xs_ref.at[pl.ds(m0, bm)], mask=m_ok, other=0).astype(jnp.float32)
    ws = plgpu.load(ws_ref.at[pl.ds(n0, bn)], mask=n_ok, other=0).astype(jnp.float32)
    y = acc.astype(jnp.float32) * xs[:, None] * ws[None, :]
    plgpu.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype),
                mask=m_ok[:, None] & n_ok[None, :])


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def int8_matmul_triton(xq, x_scale, wq, w_scale, *, out_dtype=jnp.bfloat16,
                       config: Int8Config = Int8Config(), interpret: bool = False) -> jax.Array:
    """W8A8 with the Pallas Triton kernel: int8 tensor-core dot, int32 accumulation, f32 epilogue."""
    m, k = xq.shape
    n = wq.shape[1]
    cfg = config
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(cfg, name)
        if not _is_pow2(v) or v < 16:
            raise ValueError(f"config.{name}={v} must be a power of two >= 16")
    kernel = functools.partial(_int8_kernel, m=m, n=n, k=k, bm=cfg.block_m, bn=cfg.block_n,
                               bk=cfg.block_k, mask_k=k % cfg.block_k != 0)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, cfg.block_m), pl.cdiv(n, cfg.block_n)),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jaxpass_int8_matmul",
    )(xq, x_scale.reshape(m), wq, w_scale.reshape(n))
