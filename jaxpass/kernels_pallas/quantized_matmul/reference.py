"""Plain-JAX implementations: the precise reference (for tests) and the XLA fallback (for speed).

* ``quantized_matmul_reference`` dequantizes in f32 and multiplies at ``Precision.HIGHEST``: the
  meaning every kernel is tested against.
* ``quantized_matmul_xla`` is what ``api.quantized_matmul`` runs when no kernel applies or a kernel
  would be slower (large M): it dequantizes in x's dtype inside the graph (XLA fuses the
  bitcast/convert/scale into one pass, or into its own GEMM prologue) and calls one ``dot_general``
  with f32 accumulation. Per-channel scales are applied after the dot, so the integer weights stay
  exact in bf16.
* ``int8_matmul_reference`` / ``int8_matmul_xla``: the W8A8 product with int32 accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.kernels_pallas.quantized_matmul import layout
from jaxpass.kernels_pallas.quantized_matmul.layout import PackedWeight


def _as_2d(x):
    if x.ndim < 1:
        raise ValueError(f"x must have at least one dimension, got shape {x.shape}")
    return x.reshape(-1, x.shape[-1])


def quantized_matmul_reference(x: jax.Array, pw: PackedWeight) -> jax.Array:
    """``x[..., K] @ W[K, N]`` with W dequantized in f32, product at HIGHEST precision."""
    w = layout.dequantize(pw, jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def _codes_nk(pw: PackedWeight) -> jax.Array:
    """The stored codes ``[N, K]`` as a small integer dtype XLA converts cheaply."""
    if pw.bits == 8:
        return pw.data
    u4 = lax.bitcast_convert_type(pw.data, jnp.uint4)  # [N, K/2, 2], low nibble first
    return u4.reshape(pw.n, pw.k)


def quantized_matmul_xla(x: jax.Array, pw: PackedWeight) -> jax.Array:
    """The XLA fallback: dequantize to ``x.dtype`` in the graph, then one dot with f32 accumulation."""
    if x.shape[-1] != pw.k:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's K={pw.k}")
    lead = x.shape[:-1]
    x2 = _as_2d(x)
    cdt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    off = float(layout.code_bias(pw))
    q = _codes_nk(pw).astype(cdt)  # exact: |codes| <= 255
    dn = (((1,), (1,)), ((), ()))
    if pw.per_channel:
        w = q
        if pw.zeros is not None or off:
            z = jnp.float32(off)
            if pw.zeros is not None:
                z = z + pw.zeros[0].astype(jnp.float32)[:, None]  # [N, 1]
            w = (q.astype(jnp.float32) - z).astype(cdt)
        y = lax.dot_general(x2.astype(cdt), w, dn, preferred_element_type=jnp.float32)
        y = y * pw.scales[0].astype(jnp.float32)[None, :]
    else:
        g, gs = pw.num_groups, pw.group_size
        s = pw.scales.astype(jnp.float32).T[:, :, None]  # [N, G, 1]
        qf = q.reshape(pw.n, g, gs).astype(jnp.float32)
        z = off
        if pw.zeros is not None:
            z = pw.zeros.astype(jnp.float32).T[:, :, None] + off
        w = ((qf - z) * s).astype(cdt).reshape(pw.n, pw.k)
        y = lax.dot_general(x2.astype(cdt), w, dn, preferred_element_type=jnp.float32)
    return y.astype(x.dtype).reshape(*lead, pw.n)


def _check_int8_args(xq, x_scale, wq, w_scale):
    if xq.ndim != 2 or xq.dtype != jnp.int8:
        raise ValueError(f"xq must be int8 [M, K], got {xq.dtype} {xq.shape}")
    if wq.ndim != 2 or wq.dtype != jnp.int8:
        raise ValueError(f"wq must be int8 [K, N], got {wq.dtype} {wq.shape}")
    m, k = xq.shape
    if wq.shape[0] != k:
        raise ValueError(f"wq: K={wq.shape[0]} does not match xq's K={k}")
    n = wq.shape[1]
    if x_scale.shape != (m, 1):
        raise ValueError(f"x_scale must have shape (M, 1) = {(m, 1)}, got {x_scale.shape}")
    if w_scale.shape != (1, n):
        raise ValueError(f"w_scale must have shape (1, N) = {(1, n)}, got {w_scale.shape}")


def int8_matmul_reference(xq, x_scale, wq, w_scale, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """W8A8: ``(xq @ wq)`` exactly in int32, then ``* x_scale * w_scale`` in f32, cast to out_dtype."""
    _check_int8_args(xq, x_scale, wq, w_scale)
    acc = jnp.matmul(xq.astype(jnp.int32), wq.astype(jnp.int32))
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
    return y.astype(out_dtype)


def int8_matmul_xla(xq, x_scale, wq, w_scale, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """W8A8 through XLA's int8 GEMM (int32 accumulation), scaled in one fused epilogue."""
    _check_int8_args(xq, x_scale, wq, w_scale)
    acc = lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    y = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
    return y.astype(out_dtype)
