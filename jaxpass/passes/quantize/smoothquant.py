"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per input channel ``k``: ``s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)``; the weight's row ``k`` is
multiplied by ``s_k`` and the activation divided by it (stored as the QArray's ``in_scale`` and
applied inside ``jaxpass.quantized_dot_general``), which flattens the per-token activation range
that dynamic int8 quantization must cover, at no change to the product.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxpass.passes.quantize.qarray import QArray, quantize


def smooth_quantize(w, act_max, k_axis: int, *, alpha: float, fmt: str, source: str) -> QArray:
    w = jnp.asarray(w, jnp.float32)
    w_max = jnp.max(jnp.abs(jnp.moveaxis(w, k_axis, 0)).reshape(w.shape[k_axis], -1), axis=1)
    s = jnp.maximum(jnp.asarray(act_max, jnp.float32), 1e-5) ** alpha
    s = s / jnp.maximum(w_max, 1e-5) ** (1.0 - alpha)
    s = jnp.clip(s, 1e-5, 1e5)
    shape = [1] * w.ndim
    shape[k_axis] = w.shape[k_axis]
    reduce = tuple(d for d in range(w.ndim) if d == k_axis)
    q = quantize(w * s.reshape(shape), reduce, fmt=fmt, source=source)
    return dataclasses.replace(q, in_scale=(1.0 / s).reshape(shape))
