"""The quantized matmul named op, and the rule that turns a dot on a QArray into it.

``jaxpass.quantized_dot_general`` is ``lax.dot_general`` with one operand given as a quantized
weight: its codes, scale and (asymmetric) zero point as operands, its format as static params.
Its meaning (the ``impl`` below, also the XLA fallback) is the matmul of the dequantized weight:

- per-channel symmetric int8 / int4 / fp8 (scale constant along the contracting axes): multiply
  by the codes, exact in bf16/f32, accumulate in float32 and scale the output;
- otherwise (groups, zero points, nf4, dense-and-sparse outliers): dequantize the weight, then
  multiply.

``LowerToPallas`` replaces this op by a kernel where the backend and shapes allow; what it
computes stays this function.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxpass.core.ops import define_op
from jaxpass.core.values import is_structured
from jaxpass.passes.quantize.qarray import QArray


def _scale_to_output(scale, dimension_numbers, weight_operand, x_ndim):
    """Arranges a keepdims weight scale in dot_general's output layout (batch, lhs free, rhs free)."""
    (lc, rc), (lb, rb) = dimension_numbers
    wc, wb = (rc, rb) if weight_operand == 1 else (lc, lb)
    xc, xb = (lc, lb) if weight_operand == 1 else (rc, rb)
    wf = [d for d in range(scale.ndim) if d not in wc and d not in wb]
    n_x_free = x_ndim - len(xc) - len(xb)
    s = jnp.transpose(scale, tuple(wb) + tuple(wf) + tuple(wc))
    batch_shape = [scale.shape[d] for d in wb]
    free_shape = [scale.shape[d] for d in wf]
    if weight_operand == 1:
        shape = batch_shape + [1] * n_x_free + free_shape
    else:
        shape = batch_shape + free_shape + [1] * n_x_free
    return s.reshape(shape)


def _weight(qvalue, scale, rest, dtype, fmt, packed_axis, has_zero, has_in_scale,
            has_outliers=False, has_act_scale=False) -> QArray:
    rest = list(rest)
    zero = rest.pop(0) if has_zero else None
    in_scale = rest.pop(0) if has_in_scale else None
    idx, val = (rest.pop(0), rest.pop(0)) if has_outliers else (None, None)
    act_scale = rest.pop(0) if has_act_scale else None
    return QArray(qvalue, scale, zero, dtype, fmt, packed_axis, "", in_scale, idx, val, act_scale)


def is_per_channel(w: QArray, contracting) -> bool:
    """Scale constant along every contracting axis and no zero point: the output can be scaled."""
    return (w.zero is None and w.outlier_idx is None and w.fmt in ("int8", "int4", "fp8")
            and all(w.scale.shape[d] == 1 for d in contracting))


def _quantize_activation(x, x_contracting, activations, static_scale=None):
    """Dynamic per-token quantization (one scale per activation row, over the contracting axes),
    or static: one calibrated step for the whole input (values beyond the calibrated range clip)."""
    xf = x.astype(jnp.float32)
    if static_scale is not None:
        xs = jnp.reshape(static_scale.astype(jnp.float32), (1,) * x.ndim)
        if activations == "int8":
            return jnp.clip(jnp.round(xf / xs), -127, 127).astype(jnp.int8), xs
        return jnp.clip(xf / xs, -448.0, 448.0).astype(jnp.float8_e4m3fn), xs
    amax = jnp.max(jnp.abs(xf), axis=tuple(x_contracting), keepdims=True)
    if activations == "int8":
        xs = jnp.where(amax > 0, amax / 127.0, 1.0)
        return jnp.clip(jnp.round(xf / xs), -127, 127).astype(jnp.int8), xs
    xs = jnp.where(amax > 0, amax / 448.0, 1.0)
    return (xf / xs).astype(jnp.float8_e4m3fn), xs


def _act_scale_to_output(xs, dimension_numbers, weight_operand, w_ndim):
    (lc, rc), (lb, rb) = dimension_numbers
    xc, xb = (lc, lb) if weight_operand == 1 else (rc, rb)
    wc, wb = (rc, rb) if weight_operand == 1 else (lc, lb)
    xf = [d for d in range(xs.ndim) if d not in xc and d not in xb]
    s = jnp.transpose(xs, tuple(xb) + tuple(xf) + tuple(xc))
    n_w_free = w_ndim - len(wc) - len(wb)
    batch, free = [xs.shape[d] for d in xb], [xs.shape[d] for d in xf]
    shape = batch + (free + [1] * n_w_free if weight_operand == 1 else [1] * n_w_free + free)
    return s.reshape(shape)


def _quantized_dot_general(x, qvalue, scale, *rest, dimension_numbers, weight_operand, precision,
                           out_dtype, dtype, fmt, packed_axis, has_zero=False, has_in_scale=False,
                           activations=None, has_outliers=False, has_act_scale=False):
    w = _weight(qvalue, scale, rest, dtype, fmt, packed_axis, has_zero, has_in_scale, has_outliers,
                has_act_scale)
    compute = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    (lc, rc), _ = dimension_numbers
    contracting, x_contracting = (rc, lc) if weight_operand == 1 else (lc, rc)
    per_channel = is_per_channel(w, contracting) and (w.in_scale is None or len(contracting) == 1)
    if per_channel and w.in_scale is not None:
        # Activation-aware scaling: x * in_scale along the contracting axis, codes unchanged.
        v = w.in_scale.reshape(-1).astype(jnp.float32)
        shape = [1] * x.ndim
        shape[x_contracting[0]] = v.shape[0]
        x = (x.astype(jnp.float32) * v.reshape(shape))
    if activations is not None:
        # W8A8 / FP8: both operands quantized, integer (or fp8) products, two scales after.
        if not per_channel:
            raise ValueError("activation quantization needs per-channel symmetric weights")
        xq, xs = _quantize_activation(x, x_contracting, activations, w.act_scale)
        if activations == "int8":
            wq, acc = w.codes().astype(jnp.int8), jnp.int32
        else:
            wq, acc = w.qvalue, jnp.float32
            xq, wq = xq.astype(jnp.float32), wq.astype(jnp.float32)  # exact: e4m3 fits in f32
        lhs, rhs = (xq, wq) if weight_operand == 1 else (wq, xq)
        y = lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=acc).astype(jnp.float32)
        y = y * _act_scale_to_output(xs, dimension_numbers, weight_operand, w.ndim)
        y = y * _scale_to_output(w.scale.astype(jnp.float32), dimension_numbers, weight_operand, x.ndim)
        return y.astype(out_dtype)
    wv = (w.code_values() if per_channel else w.materialize()).astype(compute)
    x = x.astype(compute)
    lhs, rhs = (x, wv) if weight_operand == 1 else (wv, x)
    y = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=jnp.float32)
    if per_channel:
        y = y * _scale_to_output(w.scale.astype(jnp.float32), dimension_numbers, weight_operand, x.ndim)
    return y.astype(out_dtype)


quantized_dot_general = define_op("quantized_dot_general", _quantized_dot_general)


def dot_general_rule(ctx, eqn, invals, activations=None):
    """Rewrites ``dot_general`` with a QArray operand into ``quantized_dot_general``
    (with dynamic activation quantization when ``activations`` is "int8" or "fp8")."""
    lhs, rhs = invals
    if not (isinstance(lhs, QArray) or isinstance(rhs, QArray)):
        return NotImplemented
    w_idx = 1 if isinstance(rhs, QArray) else 0
    w, x = invals[w_idx], invals[1 - w_idx]
    if is_structured(x):
        ctx.record("materialize", eqn, getattr(x, "source", ""),
                   "both matmul operands are compressed: the activation side is made dense")
        x = x.materialize()
    dims = eqn.params["dimension_numbers"]
    if activations is not None and not is_per_channel(w, dims[0][1] if w_idx == 1 else dims[0][0]):
        ctx.record("materialize", eqn, w.source, "activation quantization needs a per-channel "
                   "weight scale along this matmul's contracting axes: weight made dense")
        return NotImplemented
    ctx.record("rewrite", eqn, w.source, f"dot_general -> quantized_dot_general ({w.fmt}"
               + (f", {activations} activations)" if activations else ")"))
    operands = (x, w.qvalue, w.scale) + tuple(
        a for a in (w.zero, w.in_scale, w.outlier_idx, w.outlier_val, w.act_scale) if a is not None)
    return quantized_dot_general(
        *operands, dimension_numbers=dims, weight_operand=w_idx,
        precision=eqn.params.get("precision"), out_dtype=jnp.dtype(eqn.outvars[0].aval.dtype),
        dtype=jnp.dtype(w.dtype), fmt=w.fmt, packed_axis=w.packed_axis,
        has_zero=w.zero is not None, has_in_scale=w.in_scale is not None, activations=activations,
        has_outliers=w.outlier_idx is not None, has_act_scale=w.act_scale is not None)
