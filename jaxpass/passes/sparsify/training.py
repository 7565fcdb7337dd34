"""Sparse training with optax: mask updates for ``transform(..., mode="train")`` params.

With ``mode="train"``, ``Sparsify`` replaces each pruned weight by a
:class:`~jaxpass.passes.sparsify.values.MaskedWeight` (float weight + float 0/1 mask, starting
from the one-shot mask of the pass's method). ``jax.grad`` of ``t.apply`` with respect to
``t.params`` reaches the weights; the masks get zero gradients. Two recipes:

- **Gradual magnitude pruning** (Zhu & Gupta, 2017; unstructured): the gradient is masked, and
  every ``update_every`` steps the mask is recomputed from ``|w|`` at the sparsity of the cubic
  schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3``
  (:func:`cubic_schedule`). Weights start as the one-shot method left them (pruned ones at
  zero); once training runs, a pruned weight keeps its last value in ``weight`` (the mask hides
  it), so a mask that later re-admits it restores that value.
- **SR-STE** (Zhou et al., 2021; N:M): the forward pass uses the N:M-masked weight, the gradient
  reaches every weight (straight-through), and pruned weights are decayed by
  ``lambda_w * (1 - mask) * w`` so the mask stabilises; the N:M mask is recomputed from ``|w|``
  after every step.

Both are one optax ``GradientTransformation`` wrapping any optimizer (:func:`sparse_optimizer`),
so a training step is the ordinary one::

    t = jaxpass.transform(model, [passes.Sparsify(pattern="2:4")], example_args=(x,), mode="train")
    opt = sparse_optimizer(optax.adamw(1e-4))
    state = opt.init(t.params)
    grads = jax.grad(loss)(params, batch)          # loss calls t.apply(params, ...)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)  # weights step, masks are replaced
    t_inf = t.finalize(params)                      # inference model: SparseArray weights

The mask "update" is ``new_mask - old_mask`` (exact in float: values in {-1, 0, 1}), so
``optax.apply_updates`` sets the new mask and no extra state leaves the optimizer.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxpass.passes.sparsify import masks
from jaxpass.passes.sparsify.values import MaskedWeight


def _is_masked(x) -> bool:
    return isinstance(x, MaskedWeight)


def cubic_schedule(final_sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> Callable:
    """Zhu & Gupta's cubic sparsity ramp: ``initial_sparsity`` until ``begin_step``, then rising
    fast and flattening out to ``final_sparsity`` at ``end_step`` (and after)."""
    if not 0 <= initial_sparsity <= final_sparsity < 1:
        raise ValueError(f"cubic_schedule: need 0 <= initial_sparsity ({initial_sparsity}) <= "
                         f"final_sparsity ({final_sparsity}) < 1")
    if end_step <= begin_step:
        raise ValueError(f"cubic_schedule: end_step ({end_step}) must be after begin_step ({begin_step})")

    def schedule(step):
        frac = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / (end_step - begin_step), 0.0, 1.0)
        return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3
    return schedule


def magnitude_mask(mw: MaskedWeight, weight=None, sparsity=None):
    """The magnitude mask of a masked weight (of ``weight`` if given) at ``sparsity`` (default:
    its own target; N:M patterns ignore it)."""
    w = mw.weight if weight is None else weight
    pat = masks.parse_pattern(mw.pattern)
    s = mw.sparsity if sparsity is None else sparsity
    n_layer = w.ndim - mw.matrix_ndim
    return masks.mask_for(jnp.abs(w), mw.k_axis % w.ndim, n_layer, pat, s).astype(mw.mask.dtype)


def update_masks(params, sparsity=None):
    """``params`` with every :class:`MaskedWeight`'s mask recomputed from ``|weight|`` (at
    ``sparsity``, e.g. ``schedule(step)``; default: each weight's target)."""
    def one(x):
        if not _is_masked(x):
            return x
        return MaskedWeight(x.weight, magnitude_mask(x, sparsity=sparsity), x.pattern, x.sparsity,
                            x.k_axis, x.matrix_ndim, x.straight_through, x.source)
    return jax.tree_util.tree_map(one, params, is_leaf=_is_masked)


class SparseOptState(NamedTuple):
    count: jax.Array
    inner: object


def sparse_optimizer(optimizer, *, schedule: Callable | None = None, update_every: int = 1,
                     sr_ste_decay: float = 2e-4):
    """Wraps an optax optimizer for params holding :class:`MaskedWeight` values.

    - SR-STE weights (``straight_through``): adds ``sr_ste_decay * (1 - mask) * w`` to their
      gradient before the inner optimizer sees it;
    - masks: never given to the inner optimizer as trainable (their gradient is zeroed); every
      ``update_every`` steps each mask is recomputed from the updated weight's magnitude, at
      ``schedule(step)`` (unstructured) or the weight's own target.

    ``update(grads, state, params)`` needs ``params``.
    """
    import optax

    def init(params):
        return SparseOptState(jnp.zeros((), jnp.int32), optimizer.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("sparse_optimizer: update(grads, state, params) needs params "
                             "(masks are recomputed from the updated weights)")

        def regularize(g, p):
            if not _is_masked(p):
                return g
            gw = g.weight
            if p.straight_through and sr_ste_decay:
                gw = gw + sr_ste_decay * (1.0 - p.mask) * p.weight
            return MaskedWeight(gw, jnp.zeros_like(g.mask), p.pattern, p.sparsity, p.k_axis,
                                p.matrix_ndim, p.straight_through, p.source)

        grads = jax.tree_util.tree_map(regularize, grads, params, is_leaf=_is_masked)
        updates, inner = optimizer.update(grads, state.inner, params)
        step = state.count
        refresh = (step % update_every) == 0
        sparsity = None if schedule is None else schedule(step)

        def new_mask(u, p):
            if not _is_masked(p):
                return u
            w_new = p.weight + u.weight
            m = magnitude_mask(p, w_new, sparsity=sparsity)
            du = jnp.where(refresh, m - p.mask, jnp.zeros_like(p.mask))
            return MaskedWeight(u.weight, du, p.pattern, p.sparsity, p.k_axis, p.matrix_ndim,
                                p.straight_through, p.source)

        updates = jax.tree_util.tree_map(new_mask, updates, params, is_leaf=_is_masked)
        return updates, SparseOptState(step + 1, inner)

    return optax.GradientTransformation(init, update)
