"""Attention and KV-cache named ops of the Llama-family models.

These three ops are the contract between the models and KV-cache passes (int8/KIVI/H2O/SnapKV...):
a pass finds them by name in the jaxpr and replaces them, so their operands and params are fixed
here and documented in docs/models.md.

Shapes (``b`` batch, ``t`` new tokens, ``s`` sequence, ``L`` cache capacity, ``h`` query heads,
``kvh`` key/value heads, ``d`` head_dim; ``h`` is a multiple of ``kvh``, grouped-query attention):

``jaxpass.causal_attention(q, k, v; scale, sliding_window)``
    q ``[b, s, h, d]``, k/v ``[b, s, kvh, d]`` -> ``[b, s, h, d]`` (q's dtype). Token ``i`` attends to
    ``j <= i`` (and ``i - j < sliding_window`` when set). Used by the cache-free forward.

``jaxpass.kv_cache_update(k_cache, v_cache, k, v, positions; layer)``
    caches ``[b, L, kvh, d]``, new k/v ``[b, t, kvh, d]``, positions int32 ``[b, t]`` (absolute,
    contiguous per row: ``positions[:, i] == positions[:, 0] + i``) -> (new k_cache, new v_cache),
    the new keys written at rows ``positions`` (cast to the cache's dtype).

``jaxpass.cached_attention(q, k_cache, v_cache, positions; scale, sliding_window, layer)``
    q ``[b, t, h, d]``, caches ``[b, L, kvh, d]`` (already updated with this step's keys),
    positions int32 ``[b, t]`` -> ``[b, t, h, d]``. Query at position ``p`` attends to cache rows
    ``j <= p`` (so rows not yet written never contribute).

``layer`` is the decoder layer index (``-1`` under scan-over-layers, where it is traced), so a pass
can give layers different budgets. Scores and softmax are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpass.core.ops import define_op


# Largest float32 score tensor one attention call materializes; above it the queries are split
# into chunks that run one after another (``over_query_chunks``). A query row's softmax needs
# only its own scores, so each row's result is unchanged, and a long prefill no longer holds
# ``b * h * t * L * 4`` bytes at once (8K tokens, 9 heads: 2.4 GB per layer). Per backend,
# measured (docs/kv_cache.md): on a 2-core CPU at 8192 tokens with SmolLM2's 9 heads one layer
# went from 17.2 s to 7.1 s with 256 MiB chunks; on an H100 (batch 32, 2K prompt) 4 GiB chunks
# cost 4-9% of prefill speed and save 4-16 GiB of peak, so accelerators chunk only far larger
# score tensors. ``MAX_SCORE_BYTES`` overrides both.
MAX_SCORE_BYTES: int | None = None
DEFAULT_SCORE_BYTES = {"cpu": 256 * 2 ** 20}
ACCELERATOR_SCORE_BYTES = 4 * 2 ** 30


def max_score_bytes() -> int:
    """The chunking threshold in effect: ``MAX_SCORE_BYTES`` if set, else the default backend's."""
    if MAX_SCORE_BYTES is not None:
        return MAX_SCORE_BYTES
    return DEFAULT_SCORE_BYTES.get(jax.default_backend(), ACCELERATOR_SCORE_BYTES)


def over_query_chunks(fn, queries, *, keys_length: int, heads: int, out_axes,
                      max_bytes: int | None = None):
    """``fn(*queries)``, with the arrays ``queries`` (each ``[b, t, ...]``) split along ``t`` into
    chunks whose float32 scores (``b * heads * chunk * keys_length * 4`` bytes) fit ``max_bytes``
    (default: :func:`max_score_bytes`, read at call time).

    ``fn`` must treat query rows independently. ``out_axes``: for each of ``fn``'s outputs (one
    array, or a tuple), the axis holding the query rows (the chunks are concatenated there), or
    ``None`` for an output that sums over rows (the chunks' outputs are added). The chunks run as
    one ``lax.map`` (one chunk's scores live at a time). The last chunk is padded with zero rows
    (every input zero); padded rows are sliced off, so an output summed over rows must give
    them zero weight (pass a per-row weight among ``queries``).
    """
    b, t = queries[0].shape[:2]
    max_bytes = max_score_bytes() if max_bytes is None else max_bytes
    most = max(1, max_bytes // (4 * b * heads * max(keys_length, 1)))
    if most >= t:
        return fn(*queries)
    n = -(-t // most)
    chunk = -(-t // n)             # n equal chunks: at most n - 1 padded rows
    pad = n * chunk - t

    def split(a):
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    def merge(o, axis):     # [n, ..., chunk (at axis + 1), ...] -> [..., t, ...]
        if axis is None:
            return o.sum(axis=0)
        o = jnp.moveaxis(o, 0, axis)
        o = o.reshape(*o.shape[:axis], n * chunk, *o.shape[axis + 2:])
        return jax.lax.slice_in_dim(o, 0, t, axis=axis)

    out = jax.lax.map(lambda qs: fn(*qs), tuple(split(a) for a in queries))
    if not isinstance(out_axes, tuple):
        return merge(out, out_axes)
    return tuple(merge(o, a) for o, a in zip(out, out_axes))


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window):
    """Grouped-query softmax attention of q ``[b,t,h,d]`` over k/v ``[b,L,kvh,d]`` (in query
    chunks when the scores would pass :func:`max_score_bytes`).

    ``q_pos`` ``[b, t]`` and ``k_pos`` ``[b, L]`` are absolute positions; a key is visible when
    ``k_pos <= q_pos`` (and within the sliding window).
    """
    return over_query_chunks(
        lambda qc, pc: _attend_rows(qc, k, v, pc, k_pos, scale, sliding_window), (q, q_pos),
        keys_length=k.shape[1], heads=q.shape[2], out_axes=1)


def _attend_rows(q, k, v, q_pos, k_pos, scale, sliding_window):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]                      # [b, t, L]
    if sliding_window is not None:
        visible &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _causal_attention(q, k, v, *, scale, sliding_window=None):
    b, s = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return _attend(q, k, v, pos, pos, scale, sliding_window)


def _kv_cache_update(k_cache, v_cache, k, v, positions, *, layer=-1):
    del layer  # identifies the layer for passes; the update itself does not depend on it
    start = positions[:, 0].astype(jnp.int32)

    def write(cache, new):
        return jax.vmap(lambda c, n, p: jax.lax.dynamic_update_slice(
            c, n.astype(c.dtype), (p, jnp.int32(0), jnp.int32(0))))(cache, new, start)

    return write(k_cache, k), write(v_cache, v)


def _cached_attention(q, k_cache, v_cache, positions, *, scale, sliding_window=None, layer=-1):
    del layer
    b, cap = k_cache.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32), (b, cap))
    return _attend(q, k_cache, v_cache, positions.astype(jnp.int32), k_pos, scale, sliding_window)


causal_attention = define_op("causal_attention", _causal_attention)
kv_cache_update = define_op("kv_cache_update", _kv_cache_update, multiple_results=True)
cached_attention = define_op("cached_attention", _cached_attention)
