"""Structured values: compressed parameters that flow through a rewritten program.

A pass that changes how a parameter is stored (int8 data plus scales, a 2:4 sparse pair of values
and indices) replaces the parameter's leaf by a *structured value*: a pytree of arrays that knows
the logical array it stands for. While the rewriting interpreter re-traces a program, structured
values travel through it like arrays:

- layout-only equations (transpose, reshape, convert, slicing, broadcast) are applied to the
  structured value itself when it can follow them (:meth:`StructuredValue.apply_layout`), so a
  transposed int8 weight stays an int8 weight;
- region boundaries (scan, while, cond, jit, remat) carry it as a pytree, so a scan over stacked
  int8 layer weights slices the data and the per-layer scales together;
- an equation a pass has a rule for (a ``dot_general`` on an int8 weight) turns it into a named op;
- any other equation receives the dense value (:meth:`StructuredValue.materialize`), and the
  interpreter records that fallback in the report. Meaning is never changed silently.

Static metadata of a structured value must stay valid when a scan slices its leaves along the
leading axis: store axes counted from the end, or derive them from shapes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

LAYOUT_PRIMITIVES = frozenset({
    "convert_element_type", "transpose", "reshape", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "dynamic_slice", "copy", "copy_p", "reduce_precision",
    "sharding_constraint", "device_put",
})


class StructuredValue:
    """Base class for compressed values; subclasses are registered pytrees of arrays."""

    #: A short name for reports, e.g. "int8" or "2:4".
    format_name: str = "structured"
    #: The parameter path this value was made from, for reports ('' if unknown).
    source: str = ""

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dtype(self):
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def materialize(self) -> jax.Array:
        """The dense array this value stands for (traceable)."""
        raise NotImplementedError

    def apply_layout(self, primitive_name: str, params: dict, *index_operands) -> "StructuredValue | None":
        """This value after a layout-only equation, or None if it cannot follow it."""
        return None

    def nbytes(self) -> int:
        return int(sum(np.prod(l.shape) * jnp.dtype(l.dtype).itemsize
                       for l in jax.tree_util.tree_leaves(self)))


class ValueBacked(StructuredValue):
    """A structured value whose logical array has the shape and dtype of its ``value`` field
    (a pruned weight with zeros in place, a weight with whole channels removed)."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype


class TrainableValue(StructuredValue):
    """A parameter under quantization-/sparsity-aware training (``transform(..., mode="train")``).

    Its array leaves are float master weights (differentiable: ``jax.grad`` of ``t.apply`` with
    respect to ``t.params`` reaches them, so optax updates them like any parameter) plus, where a
    method needs it, non-trainable state such as a sparsity mask (stored as float 0/1 so the
    params pytree stays differentiable; its gradient is always zero). :meth:`materialize` applies
    the method's forward transform with a straight-through gradient (fake quantization, masking).

    :meth:`master` is the float weight an inference transform starts from once training is over
    (``Transformed.finalize``): the master weight itself, or the weight with its mask applied.
    """

    def master(self) -> jax.Array:
        raise NotImplementedError


def masters(tree: Any) -> Any:
    """``tree`` with every :class:`TrainableValue` replaced by its :meth:`~TrainableValue.master`
    (nested ones included: a fake-quantized masked weight becomes the masked float weight)."""
    def unwrap(x):
        while isinstance(x, TrainableValue):
            x = x.master()
        return x
    return jax.tree_util.tree_map(unwrap, tree, is_leaf=is_structured)


def is_structured(x: Any) -> bool:
    return isinstance(x, StructuredValue)


def materialize(x: Any):
    return x.materialize() if isinstance(x, StructuredValue) else x


def leaf_nbytes(x: Any) -> int:
    """Bytes of an array, ShapeDtypeStruct or structured value."""
    if isinstance(x, StructuredValue):
        return x.nbytes()
    return int(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize)


def tree_nbytes(tree: Any) -> int:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_structured)
    return sum(leaf_nbytes(l) for l in leaves if hasattr(l, "shape"))


# --------------------------------------------------------------------------------------------
# Shape helpers shared by structured values
# --------------------------------------------------------------------------------------------

def reshape_groups(in_shape, out_shape):
    """Splits a reshape into minimal groups of input and output axes with equal products.

    Returns a list of (input_axes, output_axes) pairs, or None if the shapes do not factor
    (which cannot happen for a valid reshape, but size-0 arrays are refused). Size-1 axes are
    attached to a neighbouring group.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if int(np.prod(in_shape)) != int(np.prod(out_shape)) or 0 in in_shape:
        return None
    groups = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [], []
        pi = pj = 1
        # Consume at least one axis on each side that has axes left, then balance products.
        if i < len(in_shape):
            gi.append(i); pi *= in_shape[i]; i += 1
        if j < len(out_shape):
            gj.append(j); pj *= out_shape[j]; j += 1
        while pi != pj:
            if pi < pj:
                gi.append(i); pi *= in_shape[i]; i += 1
            else:
                gj.append(j); pj *= out_shape[j]; j += 1
        # Absorb trailing size-1 axes into this group.
        while i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or out_shape[j] != 1):
            gi.append(i); i += 1
        while j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or in_shape[i] != 1):
            gj.append(j); j += 1
        groups.append((tuple(gi), tuple(gj)))
    return groups


class ComponentView(StructuredValue):
    """One old leaf of a structured value that a later pass replaced as a whole.

    When a pass replaces a structured parameter node (a QArray) by another structured value (the
    same weight pre-packed for a kernel), each equation input that used to read one of the old
    node's leaves (``['w'].qvalue``, ``['w'].scale``) now receives a view of the new value. A
    rule that knows the new value (the kernel lowering) uses ``view.owner``; any other equation
    gets ``owner.component(name)``, the old leaf rebuilt exactly.
    """

    def __init__(self, owner, name: str):
        self.owner = owner
        self.name = name

    @property
    def source(self) -> str:
        return getattr(self.owner, "source", "")

    @property
    def format_name(self) -> str:
        return f"{self.owner.format_name}{self.name}"

    def materialize(self):
        return self.owner.component(self.name)

    def apply_layout(self, primitive_name, params, *index_operands):
        # The old leaves moved in lockstep (a transposed QArray transposes codes and scales), so
        # a layout op on one view is the same op on the whole replacement.
        moved = self.owner.apply_layout(primitive_name, params, *index_operands)
        return None if moved is None else ComponentView(moved, self.name)

    @property
    def shape(self):
        return tuple(self.materialize().shape)

    @property
    def dtype(self):
        return self.materialize().dtype


jax.tree_util.register_pytree_node(
    ComponentView, lambda v: ((v.owner,), v.name), lambda name, children: ComponentView(children[0], name))
