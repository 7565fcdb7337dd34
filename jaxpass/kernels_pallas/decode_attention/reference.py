"""Plain-JAX decode attention: the f32 reference, the XLA baseline and the log-sum-exp combine.

Meaning of every backend (``q [b, hq, d]``, one query per row at position ``lengths - 1``)::

    k, v = cache.dequantize(lengths)              # [b, kvh, L, d] f32, see formats.py
    o[b, j] = softmax_t(scale * q[b, j] . k[b, j // g, t]  for t < lengths[b(, j // g)]) @ v

with ``g = hq // kvh`` (grouped-query attention: query head ``j`` reads KV head ``j // g``).
A row (or head) of length 0 attends to nothing and returns zeros.

* ``reference_decode_attention``: f32, HIGHEST precision; what tests compare against.
* ``sinks=(k, v)`` (every backend): full-precision rows ``[b, kvh, S, d]`` for positions
  ``[0, S)``, read instead of the format's rows there (attention sinks kept intact, as KVQuant /
  IntactKV do); one more partial in the combine.
* ``xla_decode_attention``: the baseline a compiler would produce: dequantize in the graph to
  ``q.dtype``, dots with f32 accumulation; also the ``backend="xla"`` fallback.
* ``partial_attention`` / ``combine``: flash-decoding's split form. A partial over a subset of
  keys is ``(acc, m, l)`` with ``m`` the running max score, ``l = sum exp(s - m)`` and
  ``acc = sum exp(s - m) v``; partials merge exactly by rescaling to the common max.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpass.kernels_pallas.decode_attention import formats as F

NEG_INF = float("-inf")


def check_args(q, cache, lengths):
    """Validates shapes; returns per-head lengths ``[b, kvh]`` int32."""
    if not isinstance(cache, (F.DenseKV, F.Int8KV, F.KiviKV, F.SparseKV)):
        raise ValueError(f"cache must be a formats cache (DenseKV, Int8KV, KiviKV, SparseKV), "
                         f"got {type(cache).__name__}")
    b, kvh, _, d = cache.shape
    if q.ndim != 3 or q.shape[0] != b or q.shape[2] != d:
        raise ValueError(f"q: expected [b={b}, hq, d={d}], got {q.shape}")
    if q.shape[1] % kvh:
        raise ValueError(f"q: {q.shape[1]} query heads is not a multiple of the cache's {kvh} "
                         f"KV heads")
    return F._per_head(lengths, b, kvh, "lengths")


def _group(q, kvh):
    b, hq, d = q.shape
    return q.reshape(b, kvh, hq // kvh, d)


def partial_attention(qg, k, v, valid, scale, *, precision=None):
    """``(acc [b,kvh,g,d], m, l [b,kvh,g])`` in f32 of grouped queries ``qg [b,kvh,g,d]`` over
    ``k, v [b,kvh,T,d]`` where ``valid [b,kvh,T]``."""
    s = jnp.einsum("bhgd,bhtd->bhgt", qg, k, preferred_element_type=jnp.float32,
                   precision=precision) * jnp.float32(scale)
    s = jnp.where(valid[:, :, None, :], s, NEG_INF)
    m = jnp.max(s, axis=-1)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum("bhgt,bhtd->bhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32,
                     precision=precision)
    return acc, m, l


def combine(accs, ms, ls):
    """Merges partials stacked on axis 2 (``acc [b,kvh,P,g,d]``, ``m, l [b,kvh,P,g]``) -> the
    normalized output ``[b,kvh,g,d]`` f32 (zeros where no key was valid)."""
    mx = jnp.max(ms, axis=2, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    w = jnp.where(jnp.isfinite(ms), jnp.exp(ms - mx), 0.0)
    den = jnp.sum(w * ls, axis=2)
    num = jnp.sum(w[..., None] * accs, axis=2)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def check_sinks(sinks, cache):
    """Validates ``sinks = (k, v)`` full-precision rows ``[b, kvh, S, d]`` (or None); returns S."""
    if sinks is None:
        return 0
    b, kvh, cap, d = cache.shape
    k, v = sinks
    if k.ndim != 4 or k.shape != v.shape or k.shape[:2] != (b, kvh) or k.shape[3] != d \
            or not 0 < k.shape[2] <= cap:
        raise ValueError(f"sinks: expected k and v of equal shape [b={b}, kvh={kvh}, S, d={d}] "
                         f"with 0 < S <= {cap}, got {k.shape} and {v.shape}")
    return int(k.shape[2])


def sink_partial(qg, sinks, lengths, scale, *, precision=None):
    """Attention over full-precision rows for positions ``[0, S)`` (those below the length) as
    a partial: the attention-sink rows a cache keeps beside its format."""
    k, v = sinks
    dt = jnp.float32 if precision is not None else qg.dtype
    valid = jnp.arange(k.shape[2], dtype=jnp.int32)[None, None, :] < lengths[..., None]
    return partial_attention(qg, k.astype(dt), v.astype(dt), valid, scale, precision=precision)


def kivi_ring_partial(qg, cache: F.KiviKV, lengths, scale, *, precision=None, skip=0):
    """The residual-ring part of KIVI attention as a partial (slot ``s`` holds position
    ``nq + (s - nq) mod R``, valid when below the length and not below ``skip``)."""
    R = cache.residual
    nq = cache.quantized_length(lengths)
    slot = jnp.arange(R, dtype=jnp.int32)
    pos = nq[..., None] + jnp.mod(slot - nq[..., None], R)
    valid = (pos < lengths[..., None]) & (pos >= skip)
    k, v = cache.k_res, cache.v_res
    if precision is not None:
        k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    else:
        k, v = k.astype(qg.dtype), v.astype(qg.dtype)
    return partial_attention(qg, k, v, valid, scale, precision=precision)


def _finish(out, q):
    b, hq, d = q.shape
    return out.reshape(b, hq, d).astype(q.dtype)


def _merge(parts, q):
    acc, m, l = (jnp.stack(x, axis=2) for x in zip(*parts))
    return _finish(combine(acc, m, l), q)


def reference_decode_attention(q, cache, lengths, *, scale, sinks=None):
    """f32 HIGHEST-precision decode attention over the dequantized cache (module docstring);
    with ``sinks = (k, v) [b, kvh, S, d]``, positions ``[0, S)`` are read from those rows."""
    ln = check_args(q, cache, lengths)
    S = check_sinks(sinks, cache)
    b, kvh, cap, d = cache.shape
    k, v = cache.dequantize(ln)
    pos = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
    qg = _group(q.astype(jnp.float32), kvh)
    hi = jax.lax.Precision.HIGHEST
    parts = [partial_attention(qg, k.astype(jnp.float32), v.astype(jnp.float32),
                               (pos < ln[..., None]) & (pos >= S), scale, precision=hi)]
    if S:
        parts.append(sink_partial(qg, sinks, ln, scale, precision=hi))
    return _merge(parts, q)


def xla_decode_attention(q, cache, lengths, *, scale, sinks=None):
    """The XLA baseline: dequantize in the graph to ``q.dtype`` then attend (f32 accumulation).

    KIVI keeps its split form (codes part + ring, merged by log-sum-exp) so XLA never
    materializes more than the cache's own capacity. ``sinks``: as the reference.
    """
    ln = check_args(q, cache, lengths)
    S = check_sinks(sinks, cache)
    b, kvh, cap, d = cache.shape
    qg = _group(q, kvh)
    pos = jnp.arange(cap, dtype=jnp.int32)[None, None, :]
    if isinstance(cache, F.KiviKV):
        nq = cache.quantized_length(ln)
        kq = F.dequantize_kivi_keys(cache.k_codes, cache.k_scale, cache.k_min, cache.bits,
                                    cache.group_size).astype(q.dtype)
        vq = F.dequantize_kivi_values(cache.v_codes, cache.v_scale, cache.v_min, cache.bits,
                                      cache.v_group_size).astype(q.dtype)
        parts = [partial_attention(qg, kq, vq, (pos < nq[..., None]) & (pos >= S), scale),
                 kivi_ring_partial(qg, cache, ln, scale, skip=S)]
    else:
        k, v = cache.dequantize(ln)
        parts = [partial_attention(qg, k.astype(q.dtype), v.astype(q.dtype),
                                   (pos < ln[..., None]) & (pos >= S), scale)]
    if S:
        parts.append(sink_partial(qg, sinks, ln, scale))
    return _merge(parts, q)
