"""Mosaic TPU decode-attention kernel (dense, int8) in Pallas interpret mode against the f32
reference over the same dequantized cache. No TPU was used: this checks the kernel's logic
(scalar-prefetched lengths, clamped block indices, split partials, scratch state across steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas import decode_attention as DA
from jaxpass.kernels_pallas.decode_attention import formats as F

B, KVH, G, L, D = 2, 2, 3, 128, 64
SCALE = D ** -0.5
CFG = DA.DecodeConfig(block_k=32, num_splits=2)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind,dtype,tol", [pytest.param("dense", jnp.float32, 2e-6,
                                                         marks=pytest.mark.slow),
                                            ("int8", jnp.bfloat16, 5e-3)])
def test_mosaic_tpu_kernel_matches_reference(kind, dtype, tol):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(11), 3)
    k = (jax.random.normal(k1, (B, KVH, L, D)) + 0.5).astype(dtype)
    v = jax.random.normal(k2, (B, KVH, L, D)).astype(dtype)
    q = jax.random.normal(k3, (B, KVH * G, D)).astype(dtype)
    lens = jnp.array([[100, 3], [L, 33]])          # per head; a split and blocks past the length
    cache = F.from_dense(kind, k, v)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="mosaic_tpu", config=CFG,
                              interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < tol


def test_mosaic_tpu_selection():
    q = jax.ShapeDtypeStruct((8, 32, 128), jnp.bfloat16)
    dense = F.init("dense", 8, 8, 4096, 128)
    sel = DA.select_implementation(q.shape, q.dtype, dense, platform="tpu")
    assert sel.backend == "mosaic_tpu" and sel.config.block_k % 128 == 0
    kivi = F.init("kivi", 8, 8, 4096, 128)
    sel = DA.select_implementation(q.shape, q.dtype, kivi, platform="tpu")
    assert sel.backend == "xla" and "kivi" in sel.reason
    with pytest.raises(ValueError, match="multiples of 128"):
        DA.select_implementation(q.shape, q.dtype, dense, backend="mosaic_tpu",
                                 config=DA.DecodeConfig(block_k=64, num_splits=1))
