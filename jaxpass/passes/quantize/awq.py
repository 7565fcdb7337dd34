"""AWQ (Lin et al., 2024): activation-aware weight quantization, scale search and clip search.

Input channels that carry large activations matter most. As llm-awq's ``auto_scale``, each
weight input row ``k`` is scaled up by ``s_k`` before quantizing (so salient rows lose less to
rounding) and the activation down by ``1/s_k`` at run time, with

    s = mean|x|^alpha / mean|w_hat|^(1 - alpha),   s <- s / sqrt(max(s) * min(s))

(``w_hat``: the weight normalised by its group's max, averaged over output channels; the
weight term is AutoAWQ's "duo scaling"; the activation-only form ``s = mean|x|^alpha`` of the
current llm-awq is searched too). ``alpha`` runs over a grid of 20 (0, 0.05, .., 0.95) for each
form, and the candidate with the lowest output error on calibration activations wins (the
unscaled weight, ``alpha = 0``, is in the grid, so the search never does worse than
round-to-nearest on the calibration sample).

Then, as llm-awq's ``auto_clip``, the range of each output channel and group of the scaled
weight is shrunk by the ratio (1.0 .. 0.55) that minimises that group's partial output error on
the calibration inputs (:mod:`~jaxpass.passes.quantize.clip`).

Differences from the paper, on purpose: the loss is each matmul's own output error (the paper
measures a block's output, e.g. the attention output for q/k/v, which a jaxpr-level pass cannot
delimit on an arbitrary model), and ``1/s`` is not folded into the previous op but stored in the
QArray as its ``in_scale`` and applied to the activation by ``jaxpass.quantized_dot_general``, so
no other layer of the model changes and each weight gets its own scales. llm-awq skips the clip
search for q/k projections (by module name); here every weight is searched.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpass.passes.quantize.clip import search_clip
from jaxpass.passes.quantize.qarray import QArray, quantize

GRID = tuple(i / 20 for i in range(20))


@jax.jit
def _output_error(x, w, deq):
    return jnp.sum((x @ (w - deq)) ** 2)


def _weight_mean(wk, group_size):
    """Mean over output channels of |w| normalised by its group's max: ``[K]``."""
    a = jnp.abs(wk)
    k = a.shape[0]
    g = k if group_size is None or k % group_size else group_size
    gm = jnp.max(a.reshape(k // g, g, -1), axis=1, keepdims=True)
    return jnp.mean((a.reshape(k // g, g, -1) / jnp.maximum(gm, 1e-8)).reshape(k, -1), axis=1)


def awq_quantize(w, x_sample, act_mean, k_axis: int, *, fmt: str, group_size, symmetric: bool,
                 source: str, grid=GRID, clip: bool = True) -> tuple[QArray, float]:
    """The AWQ QArray of a 2-D weight ``w`` and the chosen ``alpha``.

    ``x_sample [n, K]``: calibration activations; ``act_mean [K]``: mean |x| per input channel;
    ``clip``: also search the weight range per output channel and group (``auto_clip``).
    """
    w = jnp.asarray(w, jnp.float32)
    wk = jnp.moveaxis(w, k_axis, 0)                     # [K, N]
    x = jnp.asarray(x_sample, jnp.float32)
    a = jnp.maximum(jnp.asarray(act_mean, jnp.float32), 1e-8)
    wm = jnp.maximum(_weight_mean(wk, group_size), 1e-8)
    best = None
    for duo in (False, True):
        for alpha in grid:
            s = a ** alpha / (wm ** (1.0 - alpha) if duo else 1.0)
            s = jnp.clip(s, 1e-4, None)
            s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
            q = quantize(wk * s[:, None], (0,), fmt=fmt, group_size=group_size, symmetric=symmetric)
            deq = q.materialize() / s[:, None]
            err = float(_output_error(x, wk, deq))
            if best is None or err < best[0]:
                best = (err, alpha, s)
    _, alpha, s = best
    shape = [1] * w.ndim
    shape[k_axis] = w.shape[k_axis]
    scaled = w * s.reshape(shape)
    ratios = None
    if clip:   # the matmul sees x / s against the scaled weight
        ratios = search_clip(scaled, x / s[None, :], reduce_axes=(k_axis,), fmt=fmt,
                             group_size=group_size, symmetric=symmetric)
    q = quantize(scaled, (k_axis,), fmt=fmt, group_size=group_size, symmetric=symmetric,
                 source=source, clip=ratios)
    return dataclasses.replace(q, in_scale=(1.0 / s).reshape(shape).astype(jnp.float32)), alpha
