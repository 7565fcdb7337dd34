"""Softmax attention over a compressed layer's stored slots plus the step's new tokens.

Every compressed cache ends up here in one form: stored keys/values ``[b, kvh, S, d]`` with the
absolute position of each slot (``-1``: empty or evicted), optionally followed by the tokens the
current step appends (full precision, model layout ``[b, t, kvh, d]``). Visibility is by position
(a query at ``p`` sees slots ``0 <= pos <= p``, and ``p - pos < sliding_window`` when set), so the
order of slots does not matter and eviction can keep any subset. Scores and softmax are float32,
as in :mod:`jaxpass.models.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def candidates(k_slots, v_slots, pos_slots, k_new, v_new, positions):
    """Stored slots followed by the step's tokens: ``K [b,kvh,S+t,dk]``, ``V [b,kvh,S+t,dv]``,
    ``P int32 [b,kvh,S+t]``. New tokens are cast to the slots' dtypes."""
    b, kvh = k_slots.shape[:2]
    t = positions.shape[1]
    kn = jnp.swapaxes(k_new, 1, 2).astype(k_slots.dtype)
    vn = jnp.swapaxes(v_new, 1, 2).astype(v_slots.dtype)
    pn = jnp.broadcast_to(positions.astype(jnp.int32)[:, None, :], (b, kvh, t))
    return (jnp.concatenate([k_slots, kn], axis=2), jnp.concatenate([v_slots, vn], axis=2),
            jnp.concatenate([pos_slots.astype(jnp.int32), pn], axis=2))


def attend(q, k, v, pos, positions, *, scale, sliding_window=None, out_dtype=None):
    """Grouped-query attention of ``q [b, t, h, dk]`` over ``k [b, kvh, S, dk]``,
    ``v [b, kvh, S, dv]`` at slot positions ``pos [b, kvh, S]``.

    Returns ``(out [b, t, h, dv], probs [b, kvh, t, S])`` where ``probs`` is the attention mass
    each slot received, summed over the query heads of its group (float32; what H2O accumulates
    and SnapKV pools).
    """
    b, t, h, dk = q.shape
    kvh = k.shape[1]
    g = h // kvh
    cdt = q.dtype
    qg = q.reshape(b, t, kvh, g, dk)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(cdt),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    qpos = positions.astype(jnp.int32)[:, None, None, :, None]            # [b,1,1,t,1]
    kpos = pos[:, :, None, None, :]                                       # [b,kvh,1,1,S]
    visible = (kpos >= 0) & (kpos <= qpos)
    if sliding_window is not None:
        visible &= (qpos - kpos) < sliding_window
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible, probs, 0.0)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(cdt), v.astype(cdt),
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, t, h, v.shape[-1]).astype(out_dtype or q.dtype)
    return out, probs.sum(axis=2)
