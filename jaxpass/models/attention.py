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


def _attend(q, k, v, q_pos, k_pos, scale, sliding_window):
    """Grouped-query softmax attention of q ``[b,t,h,d]`` over k/v ``[b,L,kvh,d]``.

    ``q_pos`` ``[b, t]`` and ``k_pos`` ``[b, L]`` are absolute positions; a key is visible when
    ``k_pos <= q_pos`` (and within the sliding window).
    """
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
