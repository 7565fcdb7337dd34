"""QArray: a quantized weight as a structured value.

Layout (int8, this version): ``qvalue`` holds the integer codes in the parameter's own logical
shape and axis order; ``scale`` has the same rank with size 1 on every *reduced* axis (the axes
one scale is shared over: the contracting axes of the matmuls that use the weight) and full size
elsewhere. A stacked ``[L, K, N]`` weight used by a scan over layers thus gets a ``[L, 1, N]``
scale: one per layer and output channel. The dense value is ``qvalue * scale`` cast to
``dtype``.

Because the scale keeps every axis, each layout-only equation applies to the scale the way it
applies to the codes (sizes 1 stay 1), so a transposed, reshaped, sliced or scan-sliced QArray
stays a QArray. Reduced axes are derived from shapes, never stored, so scan slicing (which drops
the leading axis of every leaf) cannot make metadata stale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core.values import StructuredValue, reshape_groups


@dataclasses.dataclass
class QArray(StructuredValue):
    qvalue: jax.Array
    scale: jax.Array
    dtype: object = dataclasses.field(default=jnp.float32, metadata=dict(static=True))
    bits: int = dataclasses.field(default=8, metadata=dict(static=True))
    source: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def format_name(self) -> str:
        return f"int{self.bits}"

    @property
    def shape(self):
        return tuple(self.qvalue.shape)

    def reduced_axes(self) -> tuple[int, ...]:
        return tuple(d for d, (q, s) in enumerate(zip(self.qvalue.shape, self.scale.shape))
                     if s == 1 and q != 1)

    def describe(self) -> str:
        return (f"int{self.bits}{list(self.qvalue.shape)} + "
                f"{jnp.dtype(self.scale.dtype).name}{list(self.scale.shape)} scale")

    def materialize(self):
        return (self.qvalue.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(self.dtype)

    def _with(self, qvalue, scale, dtype=None) -> "QArray":
        return QArray(qvalue, scale, self.dtype if dtype is None else dtype, self.bits, self.source)

    def apply_layout(self, name, params, *index_operands):
        q, s = self.qvalue, self.scale
        if name in ("copy", "copy_p"):
            return self
        if name == "convert_element_type":
            new = jnp.dtype(params["new_dtype"])
            return self._with(q, s, new) if jnp.issubdtype(new, jnp.floating) else None
        if name == "transpose":
            perm = tuple(params["permutation"])
            return self._with(jnp.transpose(q, perm), jnp.transpose(s, perm))
        if name == "squeeze":
            dims = tuple(params["dimensions"])
            return self._with(lax.squeeze(q, dims), lax.squeeze(s, dims))
        if name == "broadcast_in_dim":
            shape, bdims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
            s_shape = [1] * len(shape)
            for k, d in enumerate(bdims):
                s_shape[d] = s.shape[k] if q.shape[k] == shape[d] else 1
            if any(s.shape[k] != 1 and q.shape[k] != shape[d] for k, d in enumerate(bdims)):
                return None
            return self._with(lax.broadcast_in_dim(q, shape, bdims),
                              lax.broadcast_in_dim(s, tuple(s_shape), bdims))
        if name == "reshape":
            if params.get("dimensions") is not None:
                return None
            new_shape = tuple(params["new_sizes"])
            groups = reshape_groups(q.shape, new_shape)
            if groups is None:
                return None
            s_shape = [1] * len(new_shape)
            for gi, go in groups:
                kept = [s.shape[i] == q.shape[i] for i in gi if q.shape[i] != 1]
                if kept and all(kept):
                    for o in go:
                        s_shape[o] = new_shape[o]
                elif any(kept):
                    return None  # a group mixes reduced and kept axes
            return self._with(q.reshape(new_shape), s.reshape(s_shape))
        if name == "slice":
            start, limit = params["start_indices"], params["limit_indices"]
            strides = params.get("strides") or (1,) * q.ndim
            s_start = [0 if s.shape[d] == 1 else start[d] for d in range(q.ndim)]
            s_limit = [1 if s.shape[d] == 1 else limit[d] for d in range(q.ndim)]
            s_strides = [1 if s.shape[d] == 1 else strides[d] for d in range(q.ndim)]
            return self._with(lax.slice(q, start, limit, strides),
                              lax.slice(s, s_start, s_limit, s_strides))
        if name == "dynamic_slice":
            sizes = tuple(params["slice_sizes"])
            zero = jnp.zeros((), jnp.int32)
            s_idx = [zero if s.shape[d] == 1 else index_operands[d] for d in range(q.ndim)]
            s_sizes = [1 if s.shape[d] == 1 else sizes[d] for d in range(q.ndim)]
            return self._with(lax.dynamic_slice(q, index_operands, sizes),
                              lax.dynamic_slice(s, s_idx, s_sizes))
        return None


jax.tree_util.register_dataclass(QArray, data_fields=["qvalue", "scale"],
                                 meta_fields=["dtype", "bits", "source"])


def abstract_int8(w, reduce_axes, *, source: str = "") -> QArray:
    """The QArray :func:`quantize_int8` would return, with ShapeDtypeStruct leaves."""
    scale_shape = tuple(1 if d in reduce_axes else n for d, n in enumerate(w.shape))
    return QArray(jax.ShapeDtypeStruct(tuple(w.shape), jnp.int8),
                  jax.ShapeDtypeStruct(scale_shape, jnp.float32), jnp.dtype(w.dtype), 8, source)


def quantize_int8(w, reduce_axes, *, source: str = "") -> QArray:
    """Symmetric round-to-nearest int8 with one scale per slice along ``reduce_axes``.

    Codes are in [-127, 127] (symmetric: -128 is unused so negation is exact); the scale is
    ``max|w| / 127`` over the reduced axes (1 where a slice is all zeros). Each dequantized
    element is within ``scale / 2`` of the original.
    """
    w32 = jnp.asarray(w, jnp.float32) if not isinstance(w, jax.ShapeDtypeStruct) else w
    amax = jnp.max(jnp.abs(w32), axis=tuple(reduce_axes), keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QArray(q, scale, jnp.dtype(w.dtype), 8, source)
