"""The quantized matmul named op, and the rule that turns a dot on a QArray into it.

``jaxpass.quantized_dot_general`` is ``lax.dot_general`` with one operand given as integer codes
plus a scale that is constant along that operand's contracting axes. It multiplies by the codes
(exact in the activation dtype for int8) with float32 accumulation and applies the scale to the
output, which is the matmul of the dequantized weight up to float rounding. ``LowerToPallas``
replaces this op by a kernel; its meaning stays this function.
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
    nd = scale.ndim
    wf = [d for d in range(nd) if d not in wc and d not in wb]
    n_x_free = x_ndim - len(xc) - len(xb)
    s = jnp.transpose(scale, tuple(wb) + tuple(wf) + tuple(wc))
    batch_shape = [scale.shape[d] for d in wb]
    free_shape = [scale.shape[d] for d in wf]
    if weight_operand == 1:
        shape = batch_shape + [1] * n_x_free + free_shape
    else:
        shape = batch_shape + free_shape + [1] * n_x_free
    return s.reshape(shape)


def _quantized_dot_general(x, qvalue, scale, *, dimension_numbers, weight_operand, precision,
                           out_dtype):
    compute = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    w = qvalue.astype(compute)
    x = x.astype(compute)
    lhs, rhs = (x, w) if weight_operand == 1 else (w, x)
    y = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                        preferred_element_type=jnp.float32)
    y = y * _scale_to_output(scale.astype(jnp.float32), dimension_numbers, weight_operand, x.ndim)
    return y.astype(out_dtype)


quantized_dot_general = define_op("quantized_dot_general", _quantized_dot_general)


def dot_general_rule(ctx, eqn, invals):
    """Rewrites ``dot_general`` with a QArray operand into ``quantized_dot_general``."""
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
    (lc, rc), _ = dims
    contracting = rc if w_idx == 1 else lc
    if any(w.scale.shape[d] != 1 for d in contracting):
        ctx.record("materialize", eqn, w.source,
                   "scale varies along a contracting axis of this matmul: weight made dense")
        return NotImplemented  # the interpreter materializes it
    ctx.record("rewrite", eqn, w.source, f"dot_general -> quantized_dot_general (int{w.bits})")
    return quantized_dot_general(
        x, w.qvalue, w.scale, dimension_numbers=dims, weight_operand=w_idx,
        precision=eqn.params.get("precision"), out_dtype=jnp.dtype(eqn.outvars[0].aval.dtype))
