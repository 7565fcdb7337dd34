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

from jaxpass.models.attention import over_query_chunks


def new_tokens(k_slots, v_slots, k_new, v_new, positions):
    """The step's tokens head-major like the slots: ``K [b,kvh,t,dk]``, ``V [b,kvh,t,dv]`` (cast
    to the slots' dtypes) and ``P int32 [b,kvh,t]``."""
    b, kvh = k_slots.shape[:2]
    t = positions.shape[1]
    kn = jnp.swapaxes(k_new, 1, 2).astype(k_slots.dtype)
    vn = jnp.swapaxes(v_new, 1, 2).astype(v_slots.dtype)
    pn = jnp.broadcast_to(positions.astype(jnp.int32)[:, None, :], (b, kvh, t))
    return kn, vn, pn


def _dot_dtype(dtype):
    """The dots' operand dtype: the query's, except bf16 on the CPU backend, where XLA's CPU
    runtime (jax 0.10.2) rejects some batched bf16 x bf16 -> f32 dots of this layout
    ("Unsupported element type for DotThunk", e.g. 18 slots of head dim 8) and has no fast bf16
    matmul to lose: f32 there."""
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.float32
    return dtype


def attend(q, k, v, pos, positions, *, scale, sliding_window=None, out_dtype=None, new=None,
           mass_rows=None):
    """Grouped-query attention of ``q [b, t, h, dk]`` over ``k [b, kvh, S, dk]``,
    ``v [b, kvh, S, dv]`` at slot positions ``pos [b, kvh, S]``, and over ``new = (k, v, pos)``
    (head-major, :func:`new_tokens`) after them when given: the same as attending over the
    concatenation, without copying the stored slots (a decode step reads them once).

    Returns ``(out [b, t, h, dv], mass)``. ``mass_rows=n``: ``mass [b, kvh, S (+ t_new)]`` is
    the attention probability each slot received from the last ``n`` query rows (all rows when
    ``n >= t``), summed over those rows and the query heads of the slot's group (float32; what
    H2O accumulates and SnapKV pools); ``None``: ``mass`` is None. Long prefills run in query
    chunks (:func:`jaxpass.models.attention.over_query_chunks`), each adding its rows' mass, so
    the ``[t, S]`` probabilities are never stored whole.
    """
    if new is not None and q.shape[1] > 1:
        # A prefill into an empty cache (every stored slot empty: a fresh prompt) needs only the
        # new tokens: skipping the slots halves a quantized cache's prefill attention (its
        # slots are the whole capacity). Same result, the slots' mass is zero either way.
        def fresh():
            out, mass = _attend_chunked(q, *new, positions, scale, sliding_window, out_dtype,
                                        None, mass_rows)
            if mass is not None:
                mass = jnp.concatenate([jnp.zeros(k.shape[:3], jnp.float32), mass], axis=-1)
            return out, mass

        def with_history():
            return _attend_chunked(q, k, v, pos, positions, scale, sliding_window, out_dtype,
                                   new, mass_rows)

        return jax.lax.cond(jnp.all(pos < 0), fresh, with_history)
    return _attend_chunked(q, k, v, pos, positions, scale, sliding_window, out_dtype, new,
                           mass_rows)


def _attend_chunked(q, k, v, pos, positions, scale, sliding_window, out_dtype, new, mass_rows):
    """:func:`attend` over the slots and ``new``, in query chunks."""
    t = q.shape[1]
    n_keys = k.shape[2] + (new[0].shape[2] if new is not None else 0)
    if mass_rows is None:
        fn = lambda qc, pc: _attend_rows(qc, k, v, pos, pc, None, scale, sliding_window,
                                         out_dtype, new)[0]
        return over_query_chunks(fn, (q, positions), keys_length=n_keys, heads=q.shape[2],
                                 out_axes=1), None
    weight = jnp.broadcast_to((jnp.arange(t) >= t - mass_rows).astype(jnp.float32), q.shape[:2])
    return over_query_chunks(
        lambda qc, pc, wc: _attend_rows(qc, k, v, pos, pc, wc, scale, sliding_window, out_dtype,
                                        new),
        (q, positions, weight), keys_length=n_keys, heads=q.shape[2], out_axes=(1, None))


def _attend_rows(q, k, v, pos, positions, weight, scale, sliding_window, out_dtype, new):
    """:func:`attend` of one block of query rows; ``weight [b, t]`` (or None) weights each row's
    probabilities in the returned mass."""
    b, t, h, dk = q.shape
    kvh = k.shape[1]
    g = h // kvh
    cdt = _dot_dtype(q.dtype)
    qg = q.astype(cdt).reshape(b, t, kvh, g, dk)
    segments = [(k, v)] + ([new[:2]] if new is not None else [])
    scores = jnp.concatenate(
        [jnp.einsum("btkgd,bksd->bkgts", qg, ks.astype(cdt), preferred_element_type=jnp.float32)
         for ks, _ in segments], axis=-1) * jnp.float32(scale)
    if new is not None:
        pos = jnp.concatenate([pos.astype(jnp.int32), new[2]], axis=-1)
    qpos = positions.astype(jnp.int32)[:, None, None, :, None]            # [b,1,1,t,1]
    kpos = pos[:, :, None, None, :]                                       # [b,kvh,1,1,S]
    visible = (kpos >= 0) & (kpos <= qpos)
    if sliding_window is not None:
        visible &= (qpos - kpos) < sliding_window
    lowest = jnp.finfo(jnp.float32).min
    scores = jnp.where(visible, scores, lowest)
    # softmax; a masked score's exp(lowest - max) is exactly 0. A row that sees no key at all
    # (max == lowest: only padding rows of a query chunk, or an evicted history with no new
    # tokens) would get uniform weights instead, so its output and mass are zeroed per row
    # (cheaper than masking the [t, S] probabilities a second time).
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - top)
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    sees = (top[..., 0] > lowest).astype(jnp.float32)                     # [b,kvh,g,t]
    out, at = 0.0, 0
    for _, vs in segments:
        n = vs.shape[2]
        out = out + jnp.einsum("bkgts,bksd->btkgd", probs[..., at:at + n].astype(cdt),
                               vs.astype(cdt), preferred_element_type=jnp.float32)
        at += n
    out = out * jnp.transpose(sees, (0, 3, 1, 2))[..., None]
    out = out.reshape(b, t, h, v.shape[-1]).astype(out_dtype or q.dtype)
    if weight is None:
        return out, None
    return out, jnp.einsum("bkgts,bkgt->bks", probs, sees * weight[:, None, None, :])
