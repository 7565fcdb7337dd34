"""Quantization-aware training: fake-quantized weights with a straight-through gradient.

With ``transform(..., passes=[Quantize(...)], mode="train")`` each weight the pass matches is
replaced in ``t.params`` by a :class:`FakeQuantized`: the float master weight plus the
quantizer's static configuration. Its forward value is exactly the dequantized weight that
``Quantize`` would store in inference mode (same formats, groups, zero points: the grid is
recomputed from the current weight at every step, so training and the final conversion agree);
its gradient passes straight through to the master weight (Bengio et al. 2013), so
``jax.grad`` of ``t.apply`` with respect to ``t.params`` is an ordinary float pytree that optax
updates directly. ``t.finalize(trained_params)`` then quantizes the trained weights for real.

Activation quantization (``activations="int8"`` / ``"fp8"``) is simulated the same way on the
matmul input: per-token fake quantization with a straight-through gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.values import TrainableValue, materialize
from jaxpass.passes.quantize.qarray import quantize


def straight_through(x, x_hat):
    """``x_hat`` forward (exactly: ``x - x`` is 0), identity gradient to ``x``."""
    return jax.lax.stop_gradient(x_hat) + (x - jax.lax.stop_gradient(x))


def fake_quantize(w, reduce_axes, *, fmt: str, group_size: int | None, symmetric: bool):
    """The dequantized round-to-nearest quantization of ``w`` (forward) with a straight-through
    gradient, in ``w``'s dtype."""
    q = quantize(jax.lax.stop_gradient(w), reduce_axes, fmt=fmt, group_size=group_size,
                 symmetric=symmetric)
    return straight_through(w, q.materialize().astype(w.dtype))


def fake_quantize_activation(x, contracting, activations: str):
    """Dynamic per-token fake quantization of a matmul input (one scale per row over the
    contracting axes), as ``quantized_dot_general`` does for real in inference mode."""
    xf = jax.lax.stop_gradient(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=tuple(contracting), keepdims=True)
    if activations == "int8":
        s = jnp.where(amax > 0, amax / 127.0, 1.0)
        xq = jnp.clip(jnp.round(xf / s), -127, 127) * s
    else:
        s = jnp.where(amax > 0, amax / 448.0, 1.0)
        xq = (xf / s).astype(jnp.float8_e4m3fn).astype(jnp.float32) * s
    return straight_through(x, xq.astype(x.dtype))


@dataclasses.dataclass
class FakeQuantized(TrainableValue):
    """A float master weight seen through a quantizer (forward) with straight-through gradients.

    ``reduce_axes`` are negative (counted from the end), so they stay right when a scan over
    stacked layers slices the leading axis.
    """

    weight: jax.Array
    reduce_axes: tuple[int, ...] = (-2,)
    fmt: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    source: str = ""
    cast_to: object = None        # a cast the program applies after the parameter (e.g. bf16)

    @property
    def format_name(self) -> str:
        return f"fake-{self.fmt}"

    @property
    def shape(self):
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return self.weight.dtype if self.cast_to is None else jnp.dtype(self.cast_to)

    def materialize(self):
        w = fake_quantize(self.weight, self.reduce_axes, fmt=self.fmt,
                          group_size=self.group_size, symmetric=self.symmetric)
        return w if self.cast_to is None else w.astype(self.cast_to)

    def master(self):
        return self.weight

    def apply_layout(self, name, params, *index_operands):
        # Follow a cast (applied after the quantizer, as the real QArray dequantizes in the
        # master's precision and then casts) and a transpose, so the matmul rule sees the weight;
        # anything else gets the fake-quantized dense value.
        if name == "convert_element_type" and jnp.issubdtype(params["new_dtype"], jnp.floating):
            return dataclasses.replace(self, cast_to=jnp.dtype(params["new_dtype"]))
        if name == "transpose":
            perm = tuple(params["permutation"])
            nd = self.weight.ndim
            old = {a % nd for a in self.reduce_axes}
            axes = tuple(sorted(perm.index(a) - nd for a in old))
            return dataclasses.replace(self, weight=jnp.transpose(self.weight, perm), reduce_axes=axes)
        return None


jax.tree_util.register_dataclass(
    FakeQuantized, data_fields=["weight"],
    meta_fields=["reduce_axes", "fmt", "group_size", "symmetric", "source", "cast_to"])


def make_fake_quantized(leaf, reduce_axes, path, fmt, group_size, symmetric) -> FakeQuantized:
    nd = len(leaf.shape)
    return FakeQuantized(leaf, tuple(sorted(a % nd - nd for a in reduce_axes)), fmt, group_size,
                         symmetric, path)


def fake_dot_general_rule(ctx, eqn, invals, activations=None):
    """A matmul on a fake-quantized weight: the weight's straight-through forward value (and the
    input's, with ``activations``), then the original ``dot_general``."""
    lhs, rhs = invals
    if not (isinstance(lhs, FakeQuantized) or isinstance(rhs, FakeQuantized)):
        return NotImplemented
    w_idx = 1 if isinstance(rhs, FakeQuantized) else 0
    w, x = invals[w_idx], invals[1 - w_idx]
    x = materialize(x)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    if activations is not None:
        x = fake_quantize_activation(x, lc if w_idx == 1 else rc, activations)
    ctx.record("rewrite", eqn, w.source, f"dot_general on fake-quantized {w.fmt} weight "
               "(straight-through)" + (f", {activations} activations" if activations else ""))
    ops = [x, w.materialize()] if w_idx == 1 else [w.materialize(), x]
    return compat.bind_eqn(eqn, ops)
