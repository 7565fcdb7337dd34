"""Sparse weights as structured values.

:class:`SparseArray` (inference): a pruned weight, stored dense with its zeros in place. It marks
the weight as sparse (pattern and source for reports, and for a later kernel lowering that packs
it into a compressed format) without changing how it computes. Its one array leaf, ``value``, is
a weight in its own right: a later ``Quantize`` finds it (path ``['w'].value``) and replaces it by
a ``QArray``, so ``[Sparsify(...), Quantize(...)]`` composes and the quantized weight keeps the
zeros (symmetric int8/int4, nf4 and fp8 map 0 to 0 exactly).

:class:`MaskedWeight` (``mode="train"``): the float master weight plus a float 0/1 mask. The
forward pass uses ``weight * mask``; the gradient reaches ``weight`` either masked (gradual
magnitude pruning) or dense through a straight-through estimator (SR-STE for N:M). ``master()``
is the masked weight that ``Transformed.finalize`` prunes again in inference mode.

Both keep their static metadata valid when a scan slices leading axes (axes counted from the end).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core.values import TrainableValue, ValueBacked, is_structured, materialize


def layout_array(x, name: str, params: dict, index_operands):
    """A plain array after a layout-only primitive (None where the primitive is not handled)."""
    if name in ("copy", "copy_p"):
        return x
    if name == "convert_element_type":
        return x.astype(params["new_dtype"])
    if name == "transpose":
        return jnp.transpose(x, tuple(params["permutation"]))
    if name == "squeeze":
        return lax.squeeze(x, tuple(params["dimensions"]))
    if name == "broadcast_in_dim":
        return lax.broadcast_in_dim(x, tuple(params["shape"]), tuple(params["broadcast_dimensions"]))
    if name == "reshape":
        return None if params.get("dimensions") is not None else x.reshape(tuple(params["new_sizes"]))
    if name == "slice":
        return lax.slice(x, params["start_indices"], params["limit_indices"], params.get("strides"))
    if name == "dynamic_slice":
        return lax.dynamic_slice(x, index_operands, tuple(params["slice_sizes"]))
    return None


def _moved_axis(name, params, axis, ndim):
    """Where negative axis ``axis`` goes under a transpose (None: untracked after other ops)."""
    if axis is None:
        return None
    if name == "transpose":
        return tuple(params["permutation"]).index(axis % ndim) - ndim
    if name in ("copy", "copy_p", "convert_element_type", "dynamic_slice", "slice"):
        return axis
    return None


@dataclasses.dataclass
class SparseArray(ValueBacked):
    """A pruned weight with zeros in place (``value``: an array, or a QArray after Quantize).

    ``pattern`` is "unstructured" or "N:M"; ``k_axis`` (negative) is the contracting axis the N:M
    groups run along, tracked through transposes (None once a layout op loses it).
    """

    value: Any
    pattern: str = "unstructured"
    k_axis: int | None = None
    source: str = ""

    format_name = "sparse"

    def describe(self) -> str:
        inner = (self.value.describe() if hasattr(self.value, "describe")
                 else f"{jnp.dtype(self.value.dtype).name}{list(self.value.shape)}")
        return f"{inner} ({self.pattern} sparse, zeros stored)"

    def materialize(self):
        return materialize(self.value)

    def apply_layout(self, name, params, *index_operands):
        if is_structured(self.value):
            moved = self.value.apply_layout(name, params, *index_operands)
        else:
            moved = layout_array(self.value, name, params, index_operands)
        if moved is None:
            return None
        return dataclasses.replace(self, value=moved,
                                   k_axis=_moved_axis(name, params, self.k_axis, self.ndim))


jax.tree_util.register_dataclass(SparseArray, data_fields=["value"],
                                 meta_fields=["pattern", "k_axis", "source"])


@jax.custom_vjp
def _straight_through(w, mask):
    return w * mask


def _st_fwd(w, mask):
    return w * mask, mask


def _st_bwd(mask, g):
    return g, jnp.zeros_like(mask)


_straight_through.defvjp(_st_fwd, _st_bwd)


@jax.custom_vjp
def _masked(w, mask):
    return w * mask


def _m_fwd(w, mask):
    return w * mask, mask


def _m_bwd(mask, g):
    return g * mask, jnp.zeros_like(mask)


_masked.defvjp(_m_fwd, _m_bwd)


@dataclasses.dataclass
class MaskedWeight(TrainableValue):
    """A weight under sparse training: float ``weight`` and float 0/1 ``mask`` (same shape).

    ``straight_through``: the gradient of the loss reaches pruned weights too (SR-STE: they can
    grow back when the mask is recomputed); otherwise it is masked. The mask never gets a
    gradient. ``pattern``, ``sparsity``, ``k_axis`` (negative) and ``matrix_ndim`` (trailing axes
    forming one layer's matrix) tell :mod:`jaxpass.passes.sparsify.training` how to recompute it.
    """

    weight: Any
    mask: Any
    pattern: str = "unstructured"
    sparsity: float = 0.5
    k_axis: int = -2
    matrix_ndim: int = 2
    straight_through: bool = False
    source: str = ""

    format_name = "masked"

    @property
    def shape(self):
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return self.weight.dtype

    def describe(self) -> str:
        return (f"{jnp.dtype(self.weight.dtype).name}{list(self.weight.shape)} weight + 0/1 mask "
                f"({self.pattern}, {'SR-STE' if self.straight_through else 'masked gradient'})")

    def materialize(self):
        mask = self.mask.astype(self.weight.dtype)
        fn = _straight_through if self.straight_through else _masked
        return fn(self.weight, mask)

    def master(self):
        return self.weight * self.mask.astype(self.weight.dtype)

    def apply_layout(self, name, params, *index_operands):
        if name == "convert_element_type" and not jnp.issubdtype(jnp.dtype(params["new_dtype"]), jnp.floating):
            return None
        w = layout_array(self.weight, name, params, index_operands)
        m = layout_array(self.mask, name, params, index_operands)
        if w is None or m is None:
            return None
        return dataclasses.replace(self, weight=w, mask=m)


jax.tree_util.register_dataclass(
    MaskedWeight, data_fields=["weight", "mask"],
    meta_fields=["pattern", "sparsity", "k_axis", "matrix_ndim", "straight_through", "source"])
