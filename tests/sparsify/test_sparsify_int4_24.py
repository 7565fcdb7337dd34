"""The int4 + 2:4 format, its Pallas kernel (interpret mode) against the reference, and
LowerToPallas packing [Sparsify(2:4), Quantize(int4, symmetric)] weights into it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.kernels_pallas.sparse_matmul import (PackedInt424, pack_int4_24, quantize_int4_24,
                                                  sparse_matmul, unpack_int4_24)
from jaxpass.kernels_pallas.sparse_matmul.api import select_implementation
from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import int4_24_codes
from jaxpass.kernels_pallas.sparse_matmul.int4_24_triton import Int424Config, int4_24_matmul_triton
from jaxpass.passes.lower_to_pallas import PackedLinear
from jaxpass.passes.sparsify import masks
from jaxpass.passes.sparsify.lowering import Int424Linear


def _codes24(k, n, seed=0):
    """Random 2:4 int4 codes in [-8, 7] (groups with 0, 1 and 2 nonzeros) and f32 scales."""
    kq, ks = jax.random.split(jax.random.key(seed))
    q = jax.random.randint(kq, (k, n), -8, 8)
    mask = masks.mask_for(jnp.abs(q).astype(jnp.float32) + jax.random.uniform(ks, (k, n)), 0, 0,
                          masks.parse_pattern("2:4"), 0.5)
    q = (q * mask).astype(jnp.int8)
    return q.at[4:8, 0].set(0).at[8, 1].set(0)


def test_pack_round_trip_and_bytes():
    k, n, g = 256, 24, 64
    q = _codes24(k, n)
    scales = jax.random.uniform(jax.random.key(1), (k // g, n), minval=0.5, maxval=2.0)
    pw = pack_int4_24(q, scales, g)
    np.testing.assert_array_equal(np.asarray(int4_24_codes(pw)), np.asarray(q, np.int32))
    dense = np.asarray(q, np.float32) * np.repeat(np.asarray(scales), g, axis=0)
    np.testing.assert_array_equal(np.asarray(unpack_int4_24(pw)), dense)
    assert pw.nbytes == k * n // 4 + k * n // 8 + (k // g) * n * 4     # 0.375 B/weight + scales
    assert pw.format == "int4_g64+2:4"
    # RTN quantization of a 2:4 float weight keeps the zeros, so the codes stay 2:4
    w = jax.random.normal(jax.random.key(2), (k, n))
    w = w * masks.mask_for(jnp.abs(w), 0, 0, masks.parse_pattern("2:4"), 0.5)
    pq = quantize_int4_24(w, 128)
    err = np.abs(np.asarray(unpack_int4_24(pq)) - np.asarray(w))
    step = np.repeat(np.asarray(pq.scales), 128, axis=0)
    assert (err <= step / 2 + 1e-6).all() and (np.asarray(unpack_int4_24(pq))[np.asarray(w) == 0] == 0).all()


def test_bad_input_is_a_clear_error():
    q = _codes24(64, 8)
    s = jnp.ones((1, 8))
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        pack_int4_24(jnp.ones((64, 8), jnp.int8), s, 64)
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_int4_24(jnp.zeros((12, 8), jnp.int8), jnp.ones((1, 8)), 12)
    with pytest.raises(ValueError, match="group_size=48 must divide K=64"):
        pack_int4_24(q, s, 48)
    with pytest.raises(ValueError, match="codes must be integers"):
        pack_int4_24(q.astype(jnp.float32), s, 64)
    with pytest.raises(ValueError, match="outside \\[-8, 7\\]"):
        pack_int4_24(q.at[0, 0].set(9), s, 64)
    with pytest.raises(ValueError, match="scales shape \\(2, 8\\)"):
        pack_int4_24(q, jnp.ones((2, 8)), 64)
    pw = pack_int4_24(_codes24(256, 8), jnp.ones((4, 8)), 64)
    with pytest.raises(ValueError, match="group_size=64 must be a multiple of 4 \\* groups = 128"):
        int4_24_matmul_triton(jnp.ones((1, 256)), pw, config=Int424Config(groups=32), interpret=True)


@pytest.mark.parametrize("m,dtype,g,cfg", [
    (1, jnp.bfloat16, 64, Int424Config(1, 16, 16, split_k=2)),
    (3, jnp.float32, 128, Int424Config(4, 32, 16, num_stages=1)),
    (16, jnp.bfloat16, 64, Int424Config(16, 16, 16)),          # tensor-core dot path
    pytest.param(1, jnp.float32, 128, Int424Config(1, 32, 32), marks=pytest.mark.slow),
    pytest.param(16, jnp.float32, 64, Int424Config(16, 32, 16, split_k=2), marks=pytest.mark.slow),
])
def test_kernel_matches_reference_in_interpret_mode(m, dtype, g, cfg):
    k, n = 256, 40                                   # n not a multiple of block_n: masked columns
    q = _codes24(k, n)
    scales = jax.random.uniform(jax.random.key(1), (k // g, n), minval=0.01, maxval=0.1).astype(dtype)
    pw = pack_int4_24(q, scales, g)
    x = jax.random.normal(jax.random.key(2), (m, k)).astype(dtype)
    y = int4_24_matmul_triton(x, pw, config=cfg, interpret=True)
    ref = sparse_matmul(x, pw, backend="reference")  # f32 HIGHEST on the same inputs
    assert y.dtype == dtype and y.shape == (m, n)
    if dtype == jnp.float32:
        dense = np.asarray(unpack_int4_24(pw), np.float32)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ dense, rtol=1e-5, atol=1e-4)
    else:                                            # f32 accumulation, one rounding to bf16
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-3)


def test_selection_says_why():
    pc = pack_int4_24(_codes24(256, 16), jnp.ones((1, 16)), 256)      # per channel: K/2 % 256
    sel = select_implementation((1, 256), jnp.bfloat16, pc, platform="gpu")
    assert sel.backend == "xla" and "divide K/2=128" in sel.reason
    pw = pack_int4_24(_codes24(256, 16), jnp.ones((2, 16)), 128)
    assert select_implementation((1, 256), jnp.bfloat16, pw, platform="gpu").backend == "triton"
    assert select_implementation((1, 256), jnp.bfloat16, pw, platform="cpu").backend == "xla"
    x = jax.random.normal(jax.random.key(0), (2, 256))
    np.testing.assert_allclose(sparse_matmul(x, pc, backend="auto"), x @ unpack_int4_24(pc), rtol=1e-5, atol=1e-4)


def test_lower_to_pallas_uses_int4_24_and_keeps_plain_int4():
    params = {"w": jax.random.normal(jax.random.key(0), (256, 32)),
              "v": jax.random.normal(jax.random.key(1), (64, 128)),     # used as h @ v.T
              "u": jax.random.normal(jax.random.key(2), (256, 8))}      # dense int4
    f = lambda p, x: (jnp.tanh(x @ p["w"]) @ p["v"][:, :32].T).sum(-1, keepdims=True) + x @ p["u"]
    x = jax.random.normal(jax.random.key(3), (2, 256))
    ps = [passes.Sparsify(pattern="2:4", exclude="u"),
          passes.Quantize(weights="int4", group_size=64, symmetric=True, exclude=r"\['v'\]")]
    sp = jaxpass.transform(f, ps, params=params, example_args=(x,))
    t = jaxpass.transform(f, ps + [passes.LowerToPallas(interpret=True)], params=params, example_args=(x,))
    assert isinstance(t.params["w"], Int424Linear) and isinstance(t.params["w"].packed, PackedInt424)
    assert isinstance(t.params["u"], PackedLinear)           # the ordinary int4 kernel path
    rep = t.report[-1]
    rewrites = [e.detail for e in rep.events_of("rewrite")]
    assert any("K=256 N=32 int4_g64+2:4: triton" in d for d in rewrites), rewrites
    assert any("int4_g64_sym: triton" in d for d in rewrites), rewrites
    assert any(w == "['v']" for w, _ in rep.skipped), rep.skipped   # sliced: stays dense 2:4
    assert t.params["w"].packed.nbytes == 256 * 32 * 3 // 8 + 4 * 32 * 4
    np.testing.assert_allclose(t(x), sp(x), rtol=1e-4, atol=1e-4)


def test_int4_that_is_not_2_4_along_k_takes_the_ordinary_int4_path():
    from jaxpass.passes.quantize.qarray import quantize
    from jaxpass.passes.sparsify.lowering import QuantizedSparseLinear, _pack_int4_24
    from jaxpass.passes.sparsify.values import SparseArray

    w = jax.random.normal(jax.random.key(0), (64, 16))
    w = w * masks.mask_for(jnp.abs(w), 0, 0, masks.parse_pattern("2:4"), 0.5)
    ok = _pack_int4_24(SparseArray(quantize(w, (0,), fmt="int4", group_size=32), "2:4", -2, "['w']"), 0)
    assert isinstance(ok, Int424Linear)
    np.testing.assert_allclose(ok.materialize(), quantize(w, (0,), fmt="int4", group_size=32).materialize())
    # 2:4 along N, not along the contracting K: no combined format, the plain int4 kernels instead
    bad = SparseArray(quantize(w.T.reshape(64, 16), (0,), fmt="int4", group_size=32), "2:4", -2, "['w']")
    made = _pack_int4_24(bad, 0)
    assert isinstance(made, QuantizedSparseLinear) and "not 2:4 along K" in made.note
    np.testing.assert_array_equal(made.component(".value.qvalue"), bad.value.qvalue)
    np.testing.assert_array_equal(made.component(".value.scale"), bad.value.scale)


def test_sparse_int8_weights_take_the_int8_kernel():
    params = {"w": jax.random.normal(jax.random.key(0), (256, 32))}
    f = lambda p, x: x @ p["w"]
    x = jax.random.normal(jax.random.key(3), (1, 256))
    ps = [passes.Sparsify(pattern="2:4"), passes.Quantize(weights="int8")]
    sp = jaxpass.transform(f, ps, params=params, example_args=(x,))
    t = jaxpass.transform(f, ps + [passes.LowerToPallas(backend="xla")], params=params, example_args=(x,))
    from jaxpass.passes.sparsify.lowering import QuantizedSparseLinear
    assert isinstance(t.params["w"], QuantizedSparseLinear)
    rewrites = [e.detail for e in t.report[-1].events_of("rewrite")]
    assert any("int8" in d and "2:4 sparse, int8: no combined sparse format" in d for d in rewrites), rewrites
    np.testing.assert_allclose(t(x), sp(x), rtol=1e-5, atol=1e-4)


def test_save_load_round_trip_of_int4_24(tmp_path):
    """jaxpass.load re-runs the recipe on shapes: the format decision must not need the values."""
    params = {"w": jax.random.normal(jax.random.key(0), (256, 32))}
    f = lambda p, x: x @ p["w"]
    x = jax.random.normal(jax.random.key(1), (1, 256))
    ps = [passes.Sparsify(pattern="2:4"), passes.Quantize(weights="int4", group_size=64, symmetric=True),
          passes.LowerToPallas(backend="xla")]
    t = jaxpass.transform(f, ps, params=params, example_args=(x,))
    assert isinstance(t.params["w"], Int424Linear)
    jaxpass.save(t, str(tmp_path / "ck"))
    t2 = jaxpass.load(str(tmp_path / "ck"), f, params=params)
    assert isinstance(t2.params["w"], Int424Linear)
    for a, b in zip(jax.tree_util.tree_leaves(t.params), jax.tree_util.tree_leaves(t2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(t2(x)), np.asarray(t(x)))
