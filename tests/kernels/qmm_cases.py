"""Shared helpers for the quantized-matmul kernel tests (random weights, error metric)."""

import numpy as np
import jax.numpy as jnp

from jaxpass.kernels_pallas.quantized_matmul import layout


def random_qvalues(rng, k, n, bits, symmetric):
    if bits == 8:
        return rng.integers(-128, 128, (k, n))
    return rng.integers(-8, 8, (k, n)) if symmetric else rng.integers(0, 16, (k, n))


def random_packed(rng, k, n, bits, group_size, symmetric, scale_dtype=jnp.float32,
                  zero_dtype=jnp.float32):
    g = k // (group_size or k)
    q = random_qvalues(rng, k, n, bits, symmetric)
    s = rng.uniform(0.5, 1.5, (g, n)) / (8 * np.sqrt(k))
    z = None if symmetric else jnp.asarray(rng.integers(0, 16, (g, n)), zero_dtype)
    return layout.pack(jnp.asarray(q, jnp.int8), jnp.asarray(s, scale_dtype), z, bits=bits,
                       group_size=group_size)


def rel_err(y, ref):
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(y)), "non-finite output"
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


# Relative Frobenius tolerances (docs/kernels.md): bf16 output rounding dominates bf16 cases;
# f32 cases use IEEE f32 products and differ from the HIGHEST-precision reference by summation order.
TOL = {jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3, jnp.dtype(jnp.float32): 1e-5}
