"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per input channel ``k``: ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)``; the weight's row ``k`` is
multiplied by ``s_k`` and the activation divided by it (stored as the QArray's ``in_scale`` and
applied inside ``jaxpass.quantized_dot_general``), which flattens the per-token activation range
that dynamic int8 quantization must cover, at no change to the product.

``alpha="auto"`` (as later SmoothQuant versions and Intel Neural Compressor's auto-alpha do):
per weight, each alpha of :data:`AUTO_GRID` is tried and the one whose simulated W8A8 output
(per-token quantized ``x / s`` times the per-channel quantized ``s * W``) is closest to the float
output on calibration activations is kept. One matmul's error stands in for the block's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpass.passes.quantize.qarray import QArray, quantize
from jaxpass.passes.quantize.qat import fake_quantize_activation

AUTO_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(13))     # 0.3 .. 0.9


def smooth_scales(w, act_max, k_axis: int, alpha: float):
    """The per-input-channel smoothing factors ``s [K]``."""
    w = jnp.asarray(w, jnp.float32)
    w_max = jnp.max(jnp.abs(jnp.moveaxis(w, k_axis, 0)).reshape(w.shape[k_axis], -1), axis=1)
    s = jnp.maximum(jnp.asarray(act_max, jnp.float32), 1e-5) ** alpha
    s = s / jnp.maximum(w_max, 1e-5) ** (1.0 - alpha)
    return jnp.clip(s, 1e-5, 1e5)


def smooth_quantize(w, act_max, k_axis: int, *, alpha: float, fmt: str, source: str) -> QArray:
    w = jnp.asarray(w, jnp.float32)
    s = smooth_scales(w, act_max, k_axis, alpha)
    shape = [1] * w.ndim
    shape[k_axis] = w.shape[k_axis]
    reduce = tuple(d for d in range(w.ndim) if d == k_axis)
    q = quantize(w * s.reshape(shape), reduce, fmt=fmt, source=source)
    return dataclasses.replace(q, in_scale=(1.0 / s).reshape(shape))


def _w8a8_error(x, w, act_max, k_axis, alpha, fmt, activations):
    s = smooth_scales(w, act_max, k_axis, alpha)
    wk = jnp.moveaxis(w, k_axis, 0)
    deq = quantize(wk * s[:, None], (0,), fmt=fmt).materialize() / s[:, None]
    xq = fake_quantize_activation(x / s[None, :], (1,), activations) * s[None, :]
    return jnp.sum((xq @ deq - x @ wk) ** 2)


_w8a8_error_jit = jax.jit(_w8a8_error, static_argnames=("k_axis", "fmt", "activations"))


def search_alpha(w, x_sample, act_max, k_axis: int, *, fmt: str, activations: str,
                 grid=AUTO_GRID) -> float:
    """The alpha of ``grid`` with the lowest simulated W8A8 output error on ``x_sample [n, K]``."""
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x_sample, jnp.float32)
    errs = [float(_w8a8_error_jit(x, w, act_max, k_axis, jnp.float32(a), fmt=fmt,
                                  activations=activations)) for a in grid]
    return grid[min(range(len(grid)), key=errs.__getitem__)]
