"""Plain-JAX meaning of the sparse matmul: the reference every backend is tested against, and
the XLA path (decode the compressed weight in the graph, then one dense dot)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24, unpack_24


def sparse_matmul_reference(x, pw: Packed24):
    """``x @ W`` in f32 at HIGHEST precision, returned in x's dtype."""
    w = unpack_24(pw).astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


@jax.jit
def sparse_matmul_xla(x, pw: Packed24):
    """XLA: the dense weight decoded in the graph (XLA may fuse it into the dot's operand)."""
    w = unpack_24(pw).astype(x.dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
