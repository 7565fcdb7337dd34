"""Which weights to keep: patterns and score-based masks.

Every method (magnitude, Wanda, SparseGPT's mask selection, gradual magnitude pruning during
training) reduces to "keep the highest-scoring entries of each comparison group". This module
owns the pattern grammar and that selection, in one place:

- ``"unstructured"``: keep the top ``1 - sparsity`` fraction of each group (a whole matrix, one
  output channel, or all matched weights together);
- ``"N:M"``: keep the top ``N`` of every ``M`` consecutive entries along the weight's contracting
  axis (the layout sparse tensor cores and the 2:4 storage format need).

Weights are seen as matrices ``[..., rest, K]``: leading *layer* axes (a stacked scan weight's
``L``) are kept apart, so each layer gets its own threshold, and ``K`` is the contracting axis.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from jaxpass.core.pass_api import PassError


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A parsed ``pattern=``: ``n``-of-``m`` for N:M, ``m = None`` for unstructured."""

    n: int | None = None
    m: int | None = None
    #: ``"channels"`` / ``"heads"``: whole channels or attention heads removed (structured; see
    #: :mod:`.structured`).
    channels: bool = False
    heads: bool = False

    @property
    def structured(self) -> bool:
        return self.channels or self.heads

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return "channels" if self.channels else "heads" if self.heads else "unstructured"


def parse_pattern(pattern: str) -> Pattern:
    if pattern == "unstructured":
        return Pattern()
    if pattern == "channels":
        return Pattern(channels=True)
    if pattern == "heads":
        return Pattern(heads=True)
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise PassError(f"Sparsify(pattern={pattern!r}): use 'unstructured', 'channels', 'heads' or 'N:M' with "
                        "0 < N < M, e.g. '2:4', '4:8' or '1:4' (N weights kept of every M)")
    return Pattern(int(m.group(1)), int(m.group(2)))


def as_matrices(w, k_axis: int, n_layer_axes: int):
    """``w`` as ``[layers, rest, K]`` (and the function that undoes it)."""
    k_axis = k_axis % w.ndim
    moved = jnp.moveaxis(w, k_axis, -1)
    layers = moved.shape[:n_layer_axes]
    n_layers = 1
    for d in layers:
        n_layers *= d
    mats = moved.reshape((n_layers, -1, moved.shape[-1]))

    def undo(x):
        return jnp.moveaxis(x.reshape(moved.shape), -1, k_axis)
    return mats, undo


def _keep_top(scores, n_keep):
    """0/1 mask keeping the ``n_keep`` largest entries along the last axis (ties: lower index);
    ``n_keep`` may be traced (a sparsity schedule under ``jit``)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return (ranks < n_keep).astype(jnp.float32)


def _n_keep(size: int, sparsity):
    return size - jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def select(scores, pattern: Pattern, sparsity, group: str = "matrix"):
    """0/1 float mask for ``scores [layers, rest, K]``.

    ``group``: "matrix" (one threshold per layer matrix) or "row" (per output channel, over
    ``K``, as Wanda compares). N:M ignores ``group`` and ``sparsity``: its groups are the
    M-blocks along ``K``.
    """
    scores = scores.astype(jnp.float32)
    L, R, K = scores.shape
    if pattern.is_nm:
        g = scores.reshape(L, R, K // pattern.m, pattern.m)
        return _keep_top(g, pattern.n).reshape(L, R, K)
    if group == "row":
        return _keep_top(scores, _n_keep(K, sparsity))
    flat = scores.reshape(L, R * K)
    return _keep_top(flat, _n_keep(R * K, sparsity)).reshape(L, R, K)


_select_jit = jax.jit(select, static_argnames=("pattern", "group"))


def mask_for(scores, k_axis: int, n_layer_axes: int, pattern: Pattern, sparsity,
             group: str = "matrix"):
    """The mask for ``scores`` in the weight's own layout (float 0/1)."""
    mats, undo = as_matrices(scores, k_axis, n_layer_axes)
    return undo(_select_jit(mats, pattern, sparsity, group))


def global_threshold(score_arrays, sparsity: float) -> float:
    """The magnitude below which ``sparsity`` of all entries of ``score_arrays`` lie."""
    import numpy as np
    flat = np.concatenate([np.asarray(s, np.float32).ravel() for s in score_arrays])
    k = int(round(sparsity * flat.size))
    if k == 0:
        return -np.inf
    return float(np.partition(flat, k - 1)[k - 1])


def achieved_sparsity(w) -> float:
    return float(jnp.mean((jnp.asarray(w) == 0).astype(jnp.float32)))
