"""The unstructured bitmap format, its Pallas kernel (interpret mode) against the reference, and
LowerToPallas packing unstructured sparse weights into it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.kernels_pallas.sparse_matmul import PackedBitmap, pack_bitmap, sparse_matmul, unpack_bitmap
from jaxpass.kernels_pallas.sparse_matmul.api import select_implementation
from jaxpass.kernels_pallas.sparse_matmul.bitmap_triton import BitmapConfig, bitmap_matmul_triton
from jaxpass.passes.sparsify.lowering import BitmapLinear


def _sparse(k, n, sparsity=0.7, dtype=jnp.float32, seed=0):
    kw, km = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (k, n))
    w = jnp.where(jax.random.uniform(km, (k, n)) < sparsity, 0.0, w)
    w = w.at[:, 0].set(0.0)                          # an empty column
    w = w.at[:32, 1].set(1.0).at[31, 2].set(-2.0)    # a full word; bit 31 (the sign bit) alone
    return w.astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_pack_round_trip_offsets_and_bytes(dtype):
    k, n = 256, 24
    w = _sparse(k, n, dtype=dtype)
    pb = pack_bitmap(w, block_words=4)
    np.testing.assert_array_equal(np.asarray(unpack_bitmap(pb), np.float32), np.asarray(w, np.float32))
    wn = np.asarray(w, np.float32)
    nnz = int((wn != 0).sum())
    size = -(-nnz // 8) * 8                          # all nonzeros, then < 8 zeros of padding
    assert pb.nnz == nnz and pb.values.shape == (size,)
    # offsets: where each 128-row block of each column starts in the flat value array
    per_block = (wn != 0).reshape(2, 128, n).sum(1).T                       # [N, blocks]
    starts = np.cumsum(per_block.reshape(-1)) - per_block.reshape(-1)
    np.testing.assert_array_equal(np.asarray(pb.offsets), starts.reshape(n, 2))
    item = jnp.dtype(dtype).itemsize
    assert pb.nbytes == n * (k // 32) * 4 + size * item + n * 2 * 4
    assert pb.padding_bytes == (size - nnz) * item < 8 * item
    # big enough that padding is small: 70% bf16 must really be smaller than dense (2 B/weight)
    big = pack_bitmap(_sparse(2048, 64, dtype=jnp.bfloat16))
    assert big.block_words == 16
    assert 0.70 < big.nbytes / (2048 * 64) < 0.77, big.nbytes / (2048 * 64)      # 0.733 + noise


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="K divisible by 32"):
        pack_bitmap(jnp.zeros((48, 8)))
    with pytest.raises(ValueError, match="int32 is not float32"):
        pack_bitmap(jnp.zeros((64, 8), jnp.int32))
    with pytest.raises(ValueError, match="block_words=3"):
        pack_bitmap(jnp.zeros((256, 8)), block_words=3)
    with pytest.raises(ValueError, match="2-D"):
        pack_bitmap(jnp.zeros((2, 64, 8)))
    pb = pack_bitmap(_sparse(64, 8))
    with pytest.raises(ValueError, match="does not match the weight's K=64"):
        sparse_matmul(jnp.ones((1, 32)), pb)
    with pytest.raises(ValueError, match="split_k=2 does not divide"):
        bitmap_matmul_triton(jnp.ones((1, 64)), pb, config=BitmapConfig(split_k=2), interpret=True)


@pytest.mark.parametrize("m,dtype,bw,cfg", [
    (1, jnp.bfloat16, 2, BitmapConfig(1, 16, split_k=2)),
    (3, jnp.float32, 4, BitmapConfig(4, 32, num_stages=1)),
    (16, jnp.bfloat16, 16, BitmapConfig(16, 16)),              # tensor-core dot path
    pytest.param(1, jnp.float32, 2, BitmapConfig(1, 32), marks=pytest.mark.slow),
    pytest.param(3, jnp.bfloat16, 4, BitmapConfig(4, 16, split_k=2), marks=pytest.mark.slow),
    pytest.param(16, jnp.float32, 16, BitmapConfig(16, 32), marks=pytest.mark.slow),
])
def test_kernel_matches_reference_in_interpret_mode(m, dtype, bw, cfg):
    k = 512 if bw == 16 else 256
    n = 40                                           # not a multiple of block_n: masked columns
    w = _sparse(k, n, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (m, k)).astype(dtype)
    pb = pack_bitmap(w, block_words=bw)
    y = bitmap_matmul_triton(x, pb, config=cfg, interpret=True)
    ref = sparse_matmul(x, pb, backend="reference")          # f32 HIGHEST on the same inputs
    assert y.dtype == dtype and y.shape == (m, n)
    if dtype == jnp.float32:
        np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w), rtol=1e-5, atol=1e-4)
    else:                                            # the kernel accumulates in f32, rounds once
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=2e-2)


def test_selection_says_why():
    pb = pack_bitmap(_sparse(64, 16))                # block_words 2: no dot path
    assert select_implementation((1, 64), jnp.float32, pb, platform="cpu").backend == "xla"
    assert select_implementation((1, 64), jnp.bfloat16, pb, platform="gpu").backend == "triton"
    sel = select_implementation((16, 64), jnp.bfloat16, pb, platform="gpu")
    assert sel.backend == "xla" and "block_words >= 16" in sel.reason
    assert "M=128" in select_implementation((128, 64), jnp.bfloat16, pb, platform="gpu").reason
    x = jax.random.normal(jax.random.key(2), (2, 3, 64))
    np.testing.assert_allclose(sparse_matmul(x, pb, backend="xla"), x @ unpack_bitmap(pb), rtol=1e-5, atol=1e-5)


def test_lower_to_pallas_packs_unstructured_weights_into_bitmaps():
    params = {"w": jax.random.normal(jax.random.key(0), (128, 32)),
              "v": jax.random.normal(jax.random.key(1), (64, 32))}      # used as h @ v.T
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"].T
    x = jax.random.normal(jax.random.key(3), (1, 128))
    w0 = np.asarray(params["w"]).copy()
    ps = [passes.Sparsify(sparsity=0.7)]
    t = jaxpass.transform(f, ps + [passes.LowerToPallas(interpret=True)], params=params, example_args=(x,))
    assert isinstance(t.params["w"], BitmapLinear) and isinstance(t.params["v"], BitmapLinear)
    assert isinstance(t.params["w"].packed, PackedBitmap) and t.params["v"].transposed
    rewrites = [e.detail for e in t.report[-1].events_of("rewrite")]
    assert any("K=128 N=32 bitmap-float32: triton" in d for d in rewrites), rewrites
    assert any("K=32 N=64 bitmap-float32: triton" in d for d in rewrites), rewrites
    assert t.params["w"].packed.nbytes < 0.6 * 128 * 32 * 4
    # the pass ran the lowered program (kernels in interpret mode) against the unlowered one on x
    assert t.report[-1].output_error < 1e-5, t.report[-1].output_error
    np.testing.assert_array_equal(np.asarray(params["w"]), w0)   # nothing the user passed mutated


def test_a_bitmap_no_smaller_than_dense_stays_dense():
    from jaxpass.passes.sparsify.lowering import _pack_bitmap
    from jaxpass.passes.sparsify.values import SparseArray

    w = jax.random.normal(jax.random.key(0), (256, 8)).at[3, 3].set(0.0)   # one zero in 2048
    why = _pack_bitmap(SparseArray(w, "unstructured", None, "['low']"), 0)
    assert isinstance(why, str) and "bitmap format would take" in why and "stored dense" in why
    assert "multiple of 32" in _pack_bitmap(SparseArray(_sparse(256, 8)[:48], "unstructured", None, ""), 0)
    assert isinstance(_pack_bitmap(SparseArray(_sparse(256, 8), "unstructured", None, ""), 0), BitmapLinear)
