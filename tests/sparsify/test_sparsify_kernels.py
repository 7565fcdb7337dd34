"""The compressed 2:4 format, the Pallas sparse-matmul kernel (interpret mode) against its
reference, and LowerToPallas picking it up."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.core.pass_api import PassError
from jaxpass.kernels_pallas.sparse_matmul import check_24, pack_24, sparse_matmul, unpack_24
from jaxpass.kernels_pallas.sparse_matmul.api import select_implementation
from jaxpass.kernels_pallas.sparse_matmul.pallas_triton import SparseConfig, sparse_matmul_triton
from jaxpass.passes.sparsify import masks
from jaxpass.passes.sparsify.lowering import Sparse24Linear


def _sparse24(k, n, dtype=jnp.float32, seed=0):
    w = jax.random.normal(jax.random.key(seed), (k, n))
    mask = masks.mask_for(jnp.abs(w), 0, 0, masks.parse_pattern("2:4"), 0.5)
    w = w * mask
    w = w.at[4:8, 0].set(0.0).at[8, 1].set(0.0)      # groups with fewer than 2 nonzeros
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pack_round_trip_and_bytes(dtype):
    w = _sparse24(64, 24, dtype)
    pw = pack_24(w)
    np.testing.assert_array_equal(np.asarray(unpack_24(pw), np.float32), np.asarray(w, np.float32))
    itemsize = jnp.dtype(dtype).itemsize
    assert pw.nbytes == 64 * 24 * itemsize // 2 + 64 * 24 // 8
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        check_24(jnp.ones((8, 3)))
    with pytest.raises(ValueError, match="divisible by 8"):
        check_24(jnp.zeros((12, 3)))


@pytest.mark.parametrize("m,cfg", [(1, SparseConfig(1, 16, 16)), (3, SparseConfig(4, 32, 16, split_k=2)),
                                   pytest.param(20, SparseConfig(16, 16, 16, split_k=2),
                                                marks=pytest.mark.slow)])
def test_triton_kernel_matches_reference_in_interpret_mode(m, cfg):
    k, n = 256, 40                     # n not a multiple of block_n: masked columns
    w = _sparse24(k, n)
    x = jax.random.normal(jax.random.key(1), (m, k))
    pw = pack_24(w)
    ref = np.asarray(x @ w)            # the dense product
    y = sparse_matmul_triton(x, pw, config=cfg, interpret=True)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)
    # bf16 activations and values: the reference on the same bf16 inputs, f32 accumulation.
    xb, pb = x.astype(jnp.bfloat16), pack_24(w.astype(jnp.bfloat16))
    yb = sparse_matmul_triton(xb, pb, config=cfg, interpret=True)
    refb = sparse_matmul(xb, pb, backend="reference").astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(yb, np.float32), np.asarray(refb), rtol=2e-2, atol=5e-2)


def test_selection_says_why():
    pw = pack_24(_sparse24(64, 16))
    assert select_implementation((1, 64), jnp.float32, pw, platform="cpu").backend == "xla"
    sel = select_implementation((1, 64), jnp.float32, pw, platform="gpu")
    assert sel.backend == "xla" and "K/8=8" in sel.reason
    big = pack_24(_sparse24(256, 16))
    assert select_implementation((1, 256), jnp.bfloat16, big, platform="gpu").backend == "triton"
    assert "M=128" in select_implementation((128, 256), jnp.bfloat16, big, platform="gpu").reason
    np.testing.assert_allclose(sparse_matmul(jnp.ones((2, 64)), pw, backend="xla"),
                               jnp.ones((2, 64)) @ unpack_24(pw), rtol=1e-6)


def test_lower_to_pallas_packs_2_4_weights_and_calls_the_kernel():
    params = {"w": jax.random.normal(jax.random.key(0), (256, 48)),
              "v": jax.random.normal(jax.random.key(1), (48, 256)),       # used as h @ v.T
              "u": jax.random.normal(jax.random.key(2), (256, 8))}
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"] + (x @ p["u"]).sum()
    x = jax.random.normal(jax.random.key(3), (2, 256))
    sp = jaxpass.transform(f, [passes.Sparsify(pattern="2:4", exclude="u")], params=params, example_args=(x,))
    t = jaxpass.transform(f, [passes.Sparsify(pattern="2:4", exclude="u"), passes.LowerToPallas(interpret=True)],
                          params=params, example_args=(x,))
    assert isinstance(t.params["w"], Sparse24Linear)
    rep = t.report[1]
    assert rep.bytes_after < 0.6 * rep.bytes_before
    rewrites = [e.detail for e in rep.events_of("rewrite")]
    assert any("K=256 N=48 2:4: triton" in d for d in rewrites), rewrites
    np.testing.assert_allclose(t(x), sp(x), rtol=1e-4, atol=1e-4)
    y_new = t(jax.random.normal(jax.random.key(4), (1, 256)))   # re-specialized at M=1
    assert y_new.shape == (1, 256)


def test_lower_to_pallas_reports_what_stays_dense():
    """A 70% unstructured weight whose K (48) is not a multiple of the bitmap's 32-row words has
    no sparse format: nothing is left to lower, and the error says why."""
    params = {"w": jax.random.normal(jax.random.key(0), (48, 16))}
    f = lambda p, x: x @ p["w"]
    x = jnp.ones((1, 48))
    with pytest.raises(PassError, match="no quantized weights.*not a multiple of 32"):
        jaxpass.transform(f, [passes.Sparsify(sparsity=0.7), passes.LowerToPallas()], params=params,
                          example_args=(x,))
