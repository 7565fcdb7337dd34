"""Plain-JAX meaning of the sparse matmul on the bitmap and int4 + 2:4 formats: the references
their kernels are tested against, and the XLA paths (decode the weight in the graph, one dense
dot). The 2:4 format's are in ``reference.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def dense_weight(pw, exact: bool = False):
    """The dense ``[K, N]`` weight of any packed sparse format (traceable). ``exact``: int4 + 2:4
    products ``q * scale`` in f32 rather than rounded to the scales' dtype."""
    from jaxpass.kernels_pallas.sparse_matmul.bitmap_layout import PackedBitmap, unpack_bitmap
    from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import PackedInt424, unpack_int4_24
    from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24, unpack_24

    if isinstance(pw, Packed24):
        return unpack_24(pw)
    if isinstance(pw, PackedBitmap):
        return unpack_bitmap(pw)
    if isinstance(pw, PackedInt424):
        return unpack_int4_24(pw, jnp.float32 if exact else None)
    raise TypeError(f"not a packed sparse weight: {type(pw).__name__}")


def formats_matmul_reference(x, pw):
    """``x @ W`` in f32 at HIGHEST precision, returned in x's dtype."""
    w = dense_weight(pw, exact=True).astype(jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


@jax.jit
def formats_matmul_xla(x, pw):
    """XLA: the dense weight decoded in the graph (XLA may fuse it into the dot's operand)."""
    w = dense_weight(pw).astype(x.dtype)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
