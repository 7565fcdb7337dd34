"""Pallas (Triton backend) split-K decode attention over dense, int8 and KIVI caches.

Why Triton rather than Mosaic GPU (the default Pallas GPU backend since JAX 0.9) for these kernels:
decode attention is a stream over the cache with a tiny left operand (the ``g = hq / kvh`` query
heads of one KV head, padded to 16 rows). Triton lays out ``[16, d] x [d, block_k]`` dots and the
bit-unpacking of KIVI codes for us, and its software pipelining (``num_stages``) keeps loads in
flight; Mosaic GPU wants warpgroup tiles (M >= 64 for wgmma), explicit TMA/SMEM pipelines and
layouts for sub-byte unpacks, a much larger kernel for no gain on a bandwidth-bound op. Triton
kernels also run in Pallas' CPU interpreter, so every variant is tested in CI. The Triton backend
is deprecated in JAX 0.11 but still ships; docs/decode_attention.md records the choice.

One program = (batch row, KV head, split). It streams its split of the cache in ``block_k`` steps
with an online softmax (flash-decoding) and writes an f32 partial ``(acc, m, l)``; XLA merges the
splits (and KIVI's full-precision ring) with ``reference.combine``. Programs past a row's length
stop early: ragged batches cost what their valid rows cost.

Per format, what one step computes (s: scores ``[G16, block_k]``, p: probabilities):

* dense: ``s = q @ k^T``; ``acc += p @ v``.
* int8: ``s = (q @ kq^T) * k_scale`` (the per-token scale commutes out of the dot);
  ``acc += (p * v_scale) @ vq``. For 16-bit queries the codes are decoded without int->float
  instructions (``_int8_as_f16``: f16 ``1152 + q``) and the dots run in f16 (q and ``p * v_scale``
  rounded to f16, 11-bit mantissa: finer than bf16); the bias is removed with the sums of the
  same rounded operands, so it cancels exactly.
* KIVI: per plane of the planar packing (formats.py) the codes are shifted/masked out of the
  bytes as whole tiles and decoded as ``128 + code`` in bf16 by OR-ing them into a mantissa
  (``_small_codes``; the bias is removed with the sum of the rounded left operand). Keys (per-channel scale and min of the
  group): ``s = sum_planes (q * k_scale) @ codes^T + q . k_min``, the scaled query split into a
  bf16 high and low part so that the product keeps ~16 bits. Values (per-token scale/min of each
  channel group): ``acc[group] += (p * v_scale) @ codes + (p . v_min)``.
* sparse (Mustafar): each ``[block_k, d]`` K and V tile is rebuilt from its bitmaps (a channel's
  value sits at its bit's rank within the token: a cumsum over the unpacked bits) by a gathered,
  masked load of the kept values, then as dense.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpass.kernels_pallas.decode_attention import formats as F
from jaxpass.kernels_pallas.decode_attention import reference
from jaxpass.kernels_pallas.decode_attention.config import DecodeConfig

_M_INIT = -1e30          # finite: exp(_M_INIT - m) underflows to 0 without inf - inf
_I8_BIAS = 1152.0        # f16 bits 0x6400 | (q + 128) is the f16 number 1024 + 128 + q


def _int8_as_f16(t):
    """int8 tile -> f16 tile of exact ``1152 + q``: flip the sign bit (q + 128 in 0..255) and OR
    it into the mantissa of f16 1024.0. Integer ops only: int->float conversions issue at a
    quarter of the FP32 rate on Hopper and would bound the kernel (one per cache element)."""
    u = (lax.bitcast_convert_type(t, jnp.uint8) ^ 0x80).astype(jnp.uint16)
    return lax.bitcast_convert_type(u | 0x6400, jnp.float16)


def _small_codes(c16, dtype):
    """uint16 tile of codes < 128 -> (exact ``bias + code`` in ``dtype``, bias): OR-ed into the
    mantissa of bf16 128.0 (0x4300) or f16 1024.0 (0x6400)."""
    if dtype == jnp.bfloat16:
        return lax.bitcast_convert_type(c16 | 0x4300, jnp.bfloat16), 128.0
    return lax.bitcast_convert_type(c16 | 0x6400, jnp.float16), 1024.0


def _pow2(v):
    return v > 0 and v & (v - 1) == 0


def padded_group(g: int) -> int:
    """Query rows per program: Triton dots need >= 16 rows."""
    return max(16, 1 << (g - 1).bit_length())


def check(q_shape, q_dtype, cache, cfg: DecodeConfig) -> str | None:
    """Why this kernel cannot run the problem (a message), or None."""
    b, kvh, cap, d = cache.shape
    if jnp.dtype(q_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"q dtype {jnp.dtype(q_dtype)} is not bf16/f16/f32"
    if not _pow2(d) or d < 16:
        return f"head_dim {d} must be a power of two >= 16"
    if not _pow2(cfg.block_k) or cfg.block_k < 16:
        return f"block_k={cfg.block_k} must be a power of two >= 16"
    if cfg.num_splits < 1 or cap % cfg.block_k:
        return (f"capacity {cap} is not a multiple of block_k={cfg.block_k} "
                f"(or num_splits={cfg.num_splits} < 1)")
    # Triton keeps num_stages copies of each streamed tile in shared memory (228 KB on H100);
    # measured: f32 with block_k=128, 3 stages asked for 272 KB. Estimate: K+V tiles per stage.
    smem = 2 * cfg.block_k * d * jnp.dtype(q_dtype).itemsize * cfg.num_stages
    if smem > 200 * 1024:
        return (f"block_k={cfg.block_k} x num_stages={cfg.num_stages} needs ~{smem // 1024} KB "
                f"of shared memory for {jnp.dtype(q_dtype).name} tiles (> 200 KB)")
    if q_shape[1] // kvh > 128:
        return f"{q_shape[1] // kvh} query heads per KV head (> 128)"
    if isinstance(cache, F.KiviKV):
        n = d * cache.bits // 8
        G, gv = cache.group_size, cache.v_group_size
        if cfg.block_k % G or not _pow2(G) or G < 16:
            return f"KIVI group_size {G} must be a power of two >= 16 dividing block_k"
        if n < 16:
            return f"KIVI: {n} packed bytes per row (< 16, too narrow for a dot)"
        if gv < d and ((n % gv and gv % n) or not _pow2(gv) or gv < 16):
            return (f"KIVI v_group_size {gv} must be a power of two >= 16 dividing or divisible "
                    f"by the {n} packed bytes per row (or >= d)")
    return None


def split_length(cap: int, cfg: DecodeConfig) -> int:
    """Positions per split: ``cap / num_splits`` rounded up to whole steps (so any capacity
    that is a multiple of ``block_k`` splits; the last splits may hold fewer or none)."""
    per = -(-cap // cfg.num_splits)
    return -(-per // cfg.block_k) * cfg.block_k


def _dot(a, b, f32):
    """``a [m, k] @ b[n, k]^T`` in f32 (IEEE products for f32 inputs)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if f32 else None)


def _dot_nn(a, b, f32):
    """``a [m, k] @ b[k, n]`` in f32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                           precision=lax.Precision.HIGHEST if f32 else None)


def _online_update(carry, s, pv_fn):
    """One flash step: ``s [G16, n]`` masked scores; ``pv_fn(p)`` returns the tuple of tiles to
    add to the accumulators."""
    accs, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    corr = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = corr * l + jnp.sum(p, axis=1)
    adds = pv_fn(p)
    accs = tuple(corr[:, None] * a + x for a, x in zip(accs, adds))
    return accs, m_new, l


def _kernel(len_ref, q_ref, *refs, kind, block_k, split_len, sm_scale, f32, cd, meta,
            kivi_block=0, skip=0):
    *in_refs, acc_ref, m_ref, l_ref = refs
    gp, d = q_ref.shape
    si = pl.program_id(2)
    length = len_ref[()]
    start = si * split_len
    n_valid = jnp.clip(length - start, 0, split_len)
    n_steps = pl.cdiv(n_valid, block_k)
    q = q_ref[...].astype(jnp.float32) * sm_scale      # scale folded into q once

    if kind == "kivi":
        bits, G, gv = meta
        n = d * bits // 8
        planes = 8 // bits
        mask = (1 << bits) - 1
        kc_ref, ks_ref, km_ref, vc_ref, vs_ref, vm_ref = in_refs
        qp = [q_ref[:, pl.ds(p * n, n)].astype(jnp.float32) * sm_scale for p in range(planes)]
        if gv >= d:                                      # one value group per token
            cw, n_chunks = n, 1
        else:        # a group within a plane's n bytes, or (2-bit, small d) spanning planes
            cw = min(gv, n)
            n_chunks = n // cw
        # accumulator tiles in the order (plane, chunk): channels p*n + j*cw + [0, cw)
        tiles = [(p, j) for p in range(planes) for j in range(n_chunks)]
        accs0 = tuple(jnp.zeros((gp, cw), jnp.float32) for _ in tiles)
    else:
        accs0 = (jnp.zeros((gp, d), jnp.float32),)
        qd = q.astype(cd)
        if kind == "int8" and not f32:
            q16 = q.astype(jnp.float16)
            q16_sum = jnp.sum(q16.astype(jnp.float32), axis=1, keepdims=True)

    def visible(s, off, rows):
        """Scores of positions ``[off, off + rows)`` outside ``[skip, length)`` -> -inf
        (``skip``: positions read from the sink rows instead)."""
        idx = off + lax.broadcasted_iota(jnp.int32, (1, rows), 1)
        ok = idx < length
        if skip:
            ok = ok & (idx >= skip)
        return jnp.where(ok, s, -jnp.inf)

    def sparse_rows(bm_ref, val_ref, off):
        """``[block_k, d]`` dense rows of a Mustafar tile: each channel's value sits at its bit's
        rank in the token's bitmap (a cumsum over the unpacked bits), fetched by a gathered load
        that skips the dropped channels."""
        bm = bm_ref[pl.ds(off, block_k), :].astype(jnp.int32)                    # [bk, d/8]
        shifts = lax.broadcasted_iota(jnp.int32, (1, 1, 8), 2)
        keep_bit = ((bm[:, :, None] >> shifts) & 1).reshape(block_k, d)
        slot = jnp.clip(jnp.cumsum(keep_bit, axis=1) - 1, 0, val_ref.shape[-1] - 1)
        rows = off + lax.broadcasted_iota(jnp.int32, (block_k, d), 0)
        vals = plgpu.load(val_ref.at[rows, slot], mask=keep_bit > 0, other=0)
        return vals.astype(cd)

    def dense_step(off, carry):
        if kind == "sparse":
            kbm_ref, kval_ref, vbm_ref, vval_ref = in_refs
            s = _dot(qd, sparse_rows(kbm_ref, kval_ref, off), f32)
            v = sparse_rows(vbm_ref, vval_ref, off)
            pv = lambda p: (_dot_nn(p.astype(cd), v, f32),)
        elif kind == "dense":
            k_ref, v_ref = in_refs
            s = _dot(qd, k_ref[pl.ds(off, block_k), :].astype(cd), f32)
            v = v_ref[pl.ds(off, block_k), :].astype(cd)
            pv = lambda p: (_dot_nn(p.astype(cd), v, f32),)
        elif f32:  # int8, exact f32 path (tests, f32 models)
            kq_ref, vq_ref, ks_ref, vs_ref = in_refs
            kq = kq_ref[pl.ds(off, block_k), :].astype(cd)
            s = _dot(qd, kq, f32) * ks_ref[pl.ds(off, block_k)][None, :]
            vs = vs_ref[pl.ds(off, block_k)]
            vq = vq_ref[pl.ds(off, block_k), :].astype(cd)
            pv = lambda p: (_dot_nn(p * vs[None, :], vq, f32),)
        else:      # int8, 16-bit: codes as f16 1152 + q (no int->float instructions)
            kq_ref, vq_ref, ks_ref, vs_ref = in_refs
            kf = _int8_as_f16(kq_ref[pl.ds(off, block_k), :])
            s = (_dot(q16, kf, False) - _I8_BIAS * q16_sum) * ks_ref[pl.ds(off, block_k)][None, :]
            vs = vs_ref[pl.ds(off, block_k)]
            vf = _int8_as_f16(vq_ref[pl.ds(off, block_k), :])

            def pv(p):
                pw = (p * vs[None, :]).astype(jnp.float16)
                pw_sum = jnp.sum(pw.astype(jnp.float32), axis=1, keepdims=True)
                return (_dot_nn(pw, vf, False) - _I8_BIAS * pw_sum,)
        s = visible(s, off, block_k)
        return _online_update(carry, s, pv)

    def codes_of(packed16, p):
        """Plane ``p`` of a uint16 tile of packed bytes as ``(values, bias)`` in the dot dtype:
        exact ``code + bias`` (magic-number decode, no int->float instructions) or, for f32,
        the plain codes."""
        c = (packed16 >> (p * bits)) & mask
        if f32:
            return c.astype(jnp.float32), 0.0
        return _small_codes(c, cd)

    def kivi_group(off, carry):
        """One key group of G tokens at position ``off``."""
        grp = off // G
        kc = kc_ref[pl.ds(off, G), :].astype(jnp.uint16)
        km = km_ref[pl.ds(grp, 1), :].astype(jnp.float32)
        s = jnp.sum(q * km, axis=1, keepdims=True)                               # q . k_min
        for p in range(planes):
            codes, bias = codes_of(kc, p)
            qs = qp[p] * ks_ref[pl.ds(grp, 1), pl.ds(p * n, n)].astype(jnp.float32)
            hi = qs.astype(cd)
            s = s + _dot(hi, codes, f32)
            if not f32:   # low part of the scaled query; bias removed with the rounded parts
                lo = (qs - hi.astype(jnp.float32)).astype(cd)
                s = s + _dot(lo, codes, f32) - bias * jnp.sum(
                    hi.astype(jnp.float32) + lo.astype(jnp.float32), axis=1, keepdims=True)
        s = visible(s, off, G)
        return _online_update(carry, s, lambda prob: kivi_values(off, G, prob))

    def kivi_block_step(off, carry):
        """A whole ``block_k`` of tokens: keys dequantized per plane (each group's scale and min
        rows broadcast to its G tokens), one key dot per plane, one softmax update; values as in
        ``kivi_group`` (their per-token scales commute out of the dot)."""
        ng = block_k // G
        grp0 = off // G
        kc = kc_ref[pl.ds(off, block_k), :].astype(jnp.uint16)
        s = None
        for p in range(planes):
            c = (kc >> (p * bits)) & mask
            ks = ks_ref[pl.ds(grp0, ng), pl.ds(p * n, n)].astype(jnp.float32)
            km = km_ref[pl.ds(grp0, ng), pl.ds(p * n, n)].astype(jnp.float32)
            ks = jnp.broadcast_to(ks[:, None, :], (ng, G, n)).reshape(block_k, n)
            km = jnp.broadcast_to(km[:, None, :], (ng, G, n)).reshape(block_k, n)
            if f32:
                kf = c.astype(jnp.float32) * ks + km
            elif kivi_block == 2:     # 16-bit arithmetic: code (exact) * scale + min
                codes, bias = _small_codes(c, cd)
                kf = (codes - jnp.asarray(bias, cd)) * ks.astype(cd) + km.astype(cd)
            else:
                codes, bias = _small_codes(c, jnp.bfloat16)      # exact 128 + code
                kf = (codes.astype(jnp.float32) - bias) * ks + km
            sp = _dot(qp[p].astype(cd), kf.astype(cd), f32)
            s = sp if s is None else s + sp
        s = visible(s, off, block_k)
        return _online_update(carry, s, lambda prob: kivi_values(off, block_k, prob))

    def kivi_batched_step(off, carry):
        """``kivi_block=3``: a whole ``block_k`` of tokens with the scales on the query side (as
        ``kivi_group``: no per-key dequantization arithmetic) and one dot per plane and query
        part for all ``ng`` key groups of the step: rows ``[i * gp, (i + 1) * gp)`` of the left
        operand are the query scaled by group ``i``'s scales, and each token keeps the rows of
        its own group (the other ``ng - 1`` row blocks are tensor-core work thrown away)."""
        ng = block_k // G
        grp0 = off // G
        kc = kc_ref[pl.ds(off, block_k), :].astype(jnp.uint16)
        km = km_ref[pl.ds(grp0, ng), :].astype(jnp.float32)                       # [ng, d]
        corr = jnp.sum(q[None, :, :] * km[:, None, :], axis=2)                   # q . k_min
        big = None
        for p in range(planes):
            codes, bias = codes_of(kc, p)
            ks = ks_ref[pl.ds(grp0, ng), pl.ds(p * n, n)].astype(jnp.float32)    # [ng, n]
            qs = (qp[p][None, :, :] * ks[:, None, :]).reshape(ng * gp, n)
            hi = qs.astype(cd)
            parts = [hi]
            if not f32:   # low part of the scaled query; bias removed with the rounded parts
                lo = (qs - hi.astype(jnp.float32)).astype(cd)
                parts.append(lo)
                rounded = hi.astype(jnp.float32) + lo.astype(jnp.float32)
                corr = corr - bias * jnp.sum(rounded, axis=1).reshape(ng, gp)
            for part in parts:
                sp = _dot(part, codes, f32)
                big = sp if big is None else big + sp
        scores = big.reshape(ng, gp, block_k) + corr[:, :, None]
        own = (lax.broadcasted_iota(jnp.int32, (ng, 1, block_k), 0)
               == lax.broadcasted_iota(jnp.int32, (ng, 1, block_k), 2) // G)
        s = jnp.sum(jnp.where(own, scores, 0.0), axis=0)
        s = visible(s, off, block_k)
        return _online_update(carry, s, lambda prob: kivi_values(off, block_k, prob))

    def kivi_values(off, rows, prob):
        """``acc[tile] += (prob * v_scale) @ codes + prob . v_min`` over ``rows`` tokens."""
        out = []
        chunks = [vc_ref[pl.ds(off, rows), pl.ds(j * cw, cw)].astype(jnp.uint16)
                  for j in range(n_chunks)]
        for p, j in tiles:
            vgrp = 0 if gv >= d else (p * n + j * cw) // gv
            vs = vs_ref[pl.ds(off, rows), vgrp].astype(jnp.float32)
            vm = vm_ref[pl.ds(off, rows), vgrp].astype(jnp.float32)
            codes, bias = codes_of(chunks[j], p)
            pw = (prob * vs[None, :]).astype(cd)
            t = _dot_nn(pw, codes, f32)
            if not f32:
                t = t - bias * jnp.sum(pw.astype(jnp.float32), axis=1, keepdims=True)
            out.append(t + jnp.sum(prob * vm[None, :], axis=1, keepdims=True))
        return out

    def body(i, carry):
        off = start + i * block_k        # absolute position: the refs hold whole rows
        if kind != "kivi":
            return dense_step(off, carry)
        if kivi_block == 3:
            return kivi_batched_step(off, carry)
        if kivi_block:
            return kivi_block_step(off, carry)
        for u in range(block_k // G):
            carry = kivi_group(off + u * G, carry)
        return carry

    m0 = jnp.full((gp,), _M_INIT, jnp.float32)
    l0 = jnp.zeros((gp,), jnp.float32)
    accs, m, l = lax.fori_loop(0, n_steps, body, (accs0, m0, l0))
    if kind == "kivi":
        for (p, j), a in zip(tiles, accs):
            acc_ref[:, pl.ds(p * n + j * cw, cw)] = a
    else:
        acc_ref[...] = accs[0]
    m_ref[...] = jnp.where(l > 0, m, -jnp.inf)
    l_ref[...] = l


def _cache_operands(cache, cfg):
    """(arrays, block specs, kind, meta) of the cache part the kernel streams."""
    cap, d = cache.shape[2], cache.shape[3]
    row = lambda w: pl.BlockSpec((None, None, cap, w), lambda b, h, s: (b, h, 0, 0))
    vec = pl.BlockSpec((None, None, cap), lambda b, h, s: (b, h, 0))
    if isinstance(cache, F.DenseKV):
        return [cache.k, cache.v], [row(d), row(d)], "dense", None
    if isinstance(cache, F.Int8KV):
        return ([cache.k_q, cache.v_q, cache.k_scale, cache.v_scale],
                [row(d), row(d), vec, vec], "int8", None)
    if isinstance(cache, F.SparseKV):
        return ([cache.k_bitmap, cache.k_values, cache.v_bitmap, cache.v_values],
                [row(d // 8), row(cache.keep), row(d // 8), row(cache.keep)], "sparse", None)
    n = d * cache.bits // 8
    G = cache.group_size
    nvg = cache.v_scale.shape[-1]
    kstat = pl.BlockSpec((None, None, cache.shape[2] // G, d), lambda b, h, s: (b, h, 0, 0))
    return ([cache.k_codes, cache.k_scale, cache.k_min, cache.v_codes, cache.v_scale,
             cache.v_min],
            [row(n), kstat, kstat, row(n), row(nvg), row(nvg)], "kivi",
            (cache.bits, G, cache.v_group_size))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention_triton(q, cache, lengths, *, scale, config: DecodeConfig,
                            interpret: bool = False, sinks=None):
    """Split-K decode attention (module docstring); same meaning as the reference. ``sinks``:
    the kernel masks positions below S and one more partial reads the sink rows."""
    ln = reference.check_args(q, cache, lengths)
    n_sinks = reference.check_sinks(sinks, cache)
    b, kvh, cap, d = cache.shape
    hq = q.shape[1]
    g = hq // kvh
    gp = padded_group(g)
    cfg = config
    f32 = q.dtype == jnp.float32
    cd = q.dtype
    qg = q.reshape(b, kvh, g, d)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    arrays, specs, kind, meta = _cache_operands(cache, cfg)
    kv_len = cache.quantized_length(ln) if kind == "kivi" else ln
    P = cfg.num_splits
    S = split_length(cap, cfg)
    kernel = functools.partial(_kernel, kind=kind, block_k=cfg.block_k, split_len=S,
                               sm_scale=float(scale), f32=f32, cd=cd, meta=meta,
                               kivi_block=cfg.kivi_block, skip=n_sinks)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, P),
        in_specs=[pl.BlockSpec((None, None), lambda i, h, s: (i, h)),
                  pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0))] + specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kvh, P, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, P, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, P, gp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"jaxpass_decode_attention_{kind}",
    )(kv_len, qg, *arrays)
    acc, m, l = acc[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]
    # f32 queries: IEEE products in the XLA partials too (XLA's GPU default for f32 is TF32)
    prec = lax.Precision.HIGHEST if f32 else None
    extra = []
    if kind == "kivi":
        extra.append(reference.kivi_ring_partial(q.reshape(b, kvh, g, d), cache, ln, scale,
                                                 precision=prec, skip=n_sinks))
    if n_sinks:
        extra.append(reference.sink_partial(q.reshape(b, kvh, g, d), sinks, ln, scale,
                                            precision=prec))
    for ea, em, el in extra:
        acc = jnp.concatenate([acc, ea[:, :, None]], axis=2)
        m = jnp.concatenate([m, em[:, :, None]], axis=2)
        l = jnp.concatenate([l, el[:, :, None]], axis=2)
    return reference.combine(acc, m, l).reshape(b, hq, d).astype(q.dtype)
