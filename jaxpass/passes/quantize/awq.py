"""AWQ (Lin et al., 2024): activation-aware weight quantization.

Input channels that carry large activations matter most. AWQ scales each weight input row up by
``s_k = mean|x_k|^alpha`` before quantizing (so salient rows lose less to rounding) and scales the
activation down by ``1/s_k`` at run time; ``alpha`` is searched per weight on calibration
activations to minimise the layer's output error. Here ``1/s`` is stored in the QArray as its
``in_scale`` and applied to the activation by ``jaxpass.quantized_dot_general``, so no other
layer of the model needs to change.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpass.passes.quantize.qarray import QArray, quantize

GRID = tuple(i / 20 for i in range(21))


@jax.jit
def _output_error(x, w, deq):
    return jnp.sum((x @ w - x @ deq) ** 2)


def awq_quantize(w, x_sample, act_mean, k_axis: int, *, fmt: str, group_size, symmetric: bool,
                 source: str, grid=GRID) -> tuple[QArray, float]:
    """The AWQ QArray of a 2-D weight ``w`` and the chosen ``alpha``.

    ``x_sample [n, K]``: calibration activations; ``act_mean [K]``: mean |x| per input channel.
    """
    w = jnp.asarray(w, jnp.float32)
    wk = jnp.moveaxis(w, k_axis, 0)                     # [K, N]
    x = jnp.asarray(x_sample, jnp.float32)
    a = jnp.maximum(jnp.asarray(act_mean, jnp.float32), 1e-8)
    best = None
    for alpha in grid:
        s = a ** alpha
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
    q = quantize(scaled, (k_axis,), fmt=fmt, group_size=group_size, symmetric=symmetric, source=source)
    return dataclasses.replace(q, in_scale=(1.0 / s).reshape(shape).astype(jnp.float32)), alpha
