"""Pallas (Triton backend) weight-only GEMV for decode (M <= 8): 32-bit words, one reduction.

Why a second kernel next to ``pallas_triton.py``: at M = 1 the matmul reads the weight once and
does two flops per weight, so it is bound by how fast the SMs can *unpack* bytes, not by the
tensor cores. The general kernel works on bytes and reduces across its tile at every K step; at
8192 x 8192 int4 it reached 25% of the copy bandwidth (docs/bench_matmul.md). This one:

* reads the packed weight as 32-bit words (``words = data viewed as uint32``: 8 int4 codes or 4
  int8 values per word, value ``t`` of a word in bits ``[bits * t, bits * (t + 1))``, which is
  exactly the byte layout of ``layout.py`` read little-endian, so no repacking is needed), so
  every load instruction moves 16 bytes and one shift + mask extracts a value;
* turns a code into a float without int->float instructions (``triton_common``);
* accumulates elementwise into a ``[block_n, block_words]`` f32 tile and reduces across the
  tile once, after the K loop (the byte kernel reduced at every step);
* applies scales (and zero points) per word, not per value: the 4 or 8 values of a word share
  a group, so ``sum_t s (v_t - z) x_t = s (sum_t v_t x_t - z sum_t x_t)``;
* reads x as 32-bit pairs of 16-bit activations (a free bitcast outside the kernel), value ``t``
  of word ``j`` multiplies activation ``vpw * j + t``.

Split-K (``split_k`` programs per column block, f32 partials added by XLA) gives the SMs enough
independent loads in flight; a one-step manual prefetch (``num_stages >= 2``) issues the loads
of step ``i + 1`` before the arithmetic of step ``i``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpass.kernels_pallas.quantized_matmul import layout, triton_common
from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig
from jaxpass.kernels_pallas.quantized_matmul.layout import PackedWeight

MAX_ROWS = 8


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def values_per_word(pw: PackedWeight) -> int:
    return 32 // pw.bits


def check_config(x_shape, x_dtype, pw: PackedWeight, cfg: GemvConfig) -> str | None:
    """Why the word GEMV cannot run this problem with ``cfg`` (a message), or None if it can."""
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    if m > MAX_ROWS:
        return f"M={m} rows: the word GEMV takes at most {MAX_ROWS}"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"x dtype {jnp.dtype(x_dtype).name}: the word GEMV reads 16-bit activations"
    vpw = values_per_word(pw)
    if pw.k % vpw:
        return f"K={pw.k} is not a multiple of the {vpw} values of a 32-bit word"
    if pw.group_size % vpw:
        return f"group_size={pw.group_size} is not a multiple of the {vpw} values of a word"
    for name in ("block_n", "block_words"):
        v = getattr(cfg, name)
        if not _is_pow2(v) or v < 4:
            return f"{name}={v} must be a power of two >= 4"
    if cfg.split_k < 1:
        return f"split_k={cfg.split_k} must be >= 1"
    return None


def _decode(words, t, bits, sub):
    """Value ``t`` of every word as an exact f32 (``code - sub`` for int4, ``q`` for int8)."""
    c = words >> (bits * t) if t else words
    return triton_common.int8_as_f32(c) if bits == 8 else triton_common.code_as_f32(c & 0xF, sub)


def _gemv_kernel(x_ref, w_ref, s_ref, *refs, m, n, kw, bits, sub, gwords, num_groups, has_zeros,
                 bn, bw, steps, split, mask_k, prefetch, x_dtype):
    if has_zeros:
        z_ref, o_ref = refs
    else:
        (o_ref,) = refs
    vpw = 32 // bits
    pairs = vpw // 2
    pid_n = pl.program_id(0)
    pid_s = pl.program_id(1) if split > 1 else 0
    n0 = pid_n * bn
    ch = n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    n_ok = ch < n
    jj = lax.broadcasted_iota(jnp.int32, (bw,), 0)
    # A step lies inside one group when the group is a whole number of steps (per-channel too):
    # then scales are one contiguous [bn] row, else a [bn, bw] gather (group of each word).
    uniform = gwords % bw == 0

    def load(i):
        w0 = (pid_s * steps + i) * bw
        cols = w0 + jj
        k_ok = cols < kw
        wmask = n_ok[:, None] & k_ok[None, :] if mask_k else jnp.broadcast_to(n_ok[:, None], (bn, bw))
        w = plgpu.load(w_ref.at[pl.ds(n0, bn), pl.ds(w0, bw)], mask=wmask, other=0)
        if uniform:
            g = jnp.minimum(w0 // gwords, num_groups - 1)
            s = plgpu.load(s_ref.at[g, pl.ds(n0, bn)], mask=n_ok, other=0)[:, None]
            z = (plgpu.load(z_ref.at[g, pl.ds(n0, bn)], mask=n_ok, other=0)[:, None]
                 if has_zeros else None)
        else:
            g = jnp.minimum(cols // gwords, num_groups - 1)
            smask = n_ok[:, None] & k_ok[None, :] if mask_k else jnp.broadcast_to(n_ok[:, None], (bn, bw))
            s = plgpu.load(s_ref.at[g[None, :], ch[:, None]], mask=smask, other=0)
            z = (plgpu.load(z_ref.at[g[None, :], ch[:, None]], mask=smask, other=0)
                 if has_zeros else None)
        xs = []
        for r in range(m):
            xr = []
            for p in range(pairs):
                xw = plgpu.load(x_ref.at[jnp.asarray(r, jnp.int32), pairs * cols + p], mask=k_ok if mask_k else None,
                                other=0 if mask_k else None)
                xr.extend(v.astype(jnp.float32) for v in triton_common.split_pairs(xw, x_dtype))
            xs.append(tuple(xr))
        return w, s, z, tuple(xs)

    def compute(data, accs):
        w, s, z, xs = data
        parts = [jnp.zeros((bn, bw), jnp.float32) for _ in range(m)]
        for t in range(vpw):
            v = _decode(w, t, bits, sub)
            for r in range(m):
                parts[r] = parts[r] + v * xs[r][t][None, :]
        s = s.astype(jnp.float32)
        out = []
        for r in range(m):
            part = parts[r]
            if z is not None:
                xsum = sum(xs[r][1:], xs[r][0])
                part = part - z.astype(jnp.float32) * xsum[None, :]
            out.append(accs[r] + part * s)
        return tuple(out)

    acc0 = tuple(jnp.zeros((bn, bw), jnp.float32) for _ in range(m))
    accs = triton_common.prefetched_loop(steps, load, compute, acc0, prefetch)
    for r in range(m):
        y = jnp.sum(accs[r], axis=1)
        r = jnp.asarray(r, jnp.int32)  # a shaped index (the interpreter's discharge needs one)
        if split > 1:
            plgpu.store(o_ref.at[pid_s, r, pl.ds(n0, bn)], y, mask=n_ok)
        else:
            plgpu.store(o_ref.at[r, pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=n_ok)


def as_words(pw: PackedWeight) -> jax.Array:
    """The packed data viewed as uint32 words ``[N, K / values_per_word]`` (same bytes)."""
    raw = pw.data if pw.bits == 4 else lax.bitcast_convert_type(pw.data, jnp.uint8)
    n, nbytes = raw.shape
    return lax.bitcast_convert_type(raw.reshape(n, nbytes // 4, 4), jnp.uint32)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def quantized_matmul_gemv(x: jax.Array, pw: PackedWeight, *, config: GemvConfig = GemvConfig(),
                          interpret: bool = False, words: jax.Array | None = None) -> jax.Array:
    """``x[..., K] @ W`` for at most 8 rows of 16-bit x with the word GEMV kernel.

    ``words``: ``as_words(pw)`` computed once beforehand (optional; computed here otherwise).
    Raises ValueError when :func:`check_config` rejects the problem.
    """
    why = check_config(x.shape, x.dtype, pw, config)
    lead, x2, m = triton_common.rows_of(x, pw, why and f"config {config}: {why}")
    vpw = values_per_word(pw)
    kw = pw.k // vpw
    cfg = config
    bw = max(4, min(cfg.block_words, 1 << (kw - 1).bit_length()))  # no longer than K needs
    total = pl.cdiv(kw, bw)
    split = max(1, min(cfg.split_k, total))
    steps = pl.cdiv(total, split)
    mask_k = kw % bw != 0 or steps * split != total
    xp = lax.bitcast_convert_type(x2.reshape(m, pw.k // 2, 2), jnp.uint32)
    w32 = as_words(pw) if words is None else words
    if w32.shape != (pw.n, kw) or w32.dtype != jnp.uint32:
        raise ValueError(f"words must be uint32 {(pw.n, kw)}, got {w32.dtype} {w32.shape}")
    kernel = functools.partial(
        _gemv_kernel, m=m, n=pw.n, kw=kw, bits=pw.bits,
        sub=float(layout.code_bias(pw) if pw.bits == 4 else 128), gwords=pw.group_size // vpw,
        num_groups=pw.num_groups, has_zeros=pw.zeros is not None, bn=cfg.block_n, bw=bw,
        steps=steps, split=split, mask_k=mask_k, prefetch=cfg.num_stages >= 2, x_dtype=x.dtype)
    args = [xp, w32, pw.scales] + ([pw.zeros] if pw.zeros is not None else [])
    out = triton_common.split_k_call(
        kernel, args, grid=(pl.cdiv(pw.n, cfg.block_n),), split=split, m=m, n=pw.n,
        out_dtype=x.dtype, num_warps=cfg.num_warps, name=f"jaxpass_gemv_{pw.format}",
        interpret=interpret)
    return out.reshape(*lead, pw.n)
