"""pack / unpack / dequantize: exact round trips, the documented byte layout, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas.quantized_matmul import layout
from qmm_cases import random_packed, random_qvalues


@pytest.mark.parametrize("bits,group_size,symmetric", [
    (4, 32, True), (4, 64, False), (4, 128, True), (4, None, False),
    (8, 64, True), (8, None, True), (8, 128, False)])
def test_round_trip_exact(bits, group_size, symmetric):
    rng = np.random.default_rng(bits * 1000 + (group_size or 0) + symmetric)
    k, n = 256, 48
    q = random_qvalues(rng, k, n, bits, symmetric)
    g = k // (group_size or k)
    s = jnp.asarray(rng.uniform(0.1, 1.0, (g, n)), jnp.bfloat16)
    z = None if symmetric else jnp.asarray(rng.integers(0, 16, (g, n)), jnp.int8)
    pw = layout.pack(jnp.asarray(q, jnp.int8), s, z, bits=bits, group_size=group_size)
    q2, s2, z2 = layout.unpack(pw)
    np.testing.assert_array_equal(np.asarray(q2), q)
    assert s2.dtype == s.dtype and bool(jnp.all(s2 == s))
    if z is not None:
        assert bool(jnp.all(z2 == z))
    assert pw.group_size == (group_size or k) and pw.shape == (k, n)
    if bits == 4:  # really two values per byte
        assert pw.data.dtype == jnp.uint8 and pw.data.shape == (n, k // 2)


def test_int4_byte_layout_is_xla_nibble_order():
    q = np.array([[1, -2], [3, 4], [-8, 7], [0, -1]], np.int8)  # K=4, N=2, symmetric
    pw = layout.pack(jnp.asarray(q), jnp.ones((1, 2)), bits=4, group_size=None)
    codes = q.astype(np.int32) + 8
    expected = (codes[0::2].T | (codes[1::2].T << 4)).astype(np.uint8)  # [N, K/2]
    np.testing.assert_array_equal(np.asarray(pw.data), expected)
    u4 = jax.lax.bitcast_convert_type(pw.data, jnp.uint4).reshape(2, 4).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(u4), codes.T)


def test_dequantize_matches_formula():
    rng = np.random.default_rng(1)
    pw = random_packed(rng, 128, 24, 4, 32, symmetric=False)
    q, s, z = layout.unpack(pw)
    w = (np.asarray(q, np.float32).reshape(4, 32, 24) - np.asarray(z)[:, None]) * \
        np.asarray(s)[:, None]
    np.testing.assert_allclose(np.asarray(layout.dequantize(pw)), w.reshape(128, 24), rtol=1e-6)


def test_packed_weight_is_a_pytree_through_jit():
    pw = random_packed(np.random.default_rng(2), 64, 16, 4, 32, symmetric=True)
    leaves, treedef = jax.tree_util.tree_flatten(pw)
    assert len(leaves) == 2  # data, scales (zeros is None)
    out = jax.jit(lambda p: p)(pw)
    assert out.format == "int4_g32_sym" and bool(jnp.all(out.data == pw.data))
    assert pw.nbytes == 16 * 32 + 2 * 16 * 4


@pytest.mark.parametrize("kwargs,arg", [
    (dict(q=np.zeros((5, 4), np.int8), bits=4, group_size=None), "qvalues"),  # odd K, int4
    (dict(q=np.zeros((64, 4), np.int8), bits=4, group_size=48), "group_size"),
    (dict(q=np.zeros((64, 4), np.float32), bits=8, group_size=None), "qvalues"),
    (dict(q=np.zeros((64, 4), np.int8), bits=8, group_size=32, s=np.ones((3, 4))), "scales"),
    (dict(q=np.zeros((64, 4), np.int8), bits=8, group_size=None, s=np.ones((1, 4), np.int32)),
     "scales"),
    (dict(q=np.full((64, 4), 9, np.int8), bits=4, group_size=None), "qvalues"),  # out of range
    (dict(q=np.full((64, 4), -1, np.int8), bits=4, group_size=None, z=np.ones((1, 4))),
     "qvalues"),
    (dict(q=np.zeros((64, 4), np.int8), bits=4, group_size=None, z=np.ones((2, 4))), "zeros"),
    (dict(q=np.zeros((64, 4), np.int8), bits=3, group_size=None), "bits"),
])
def test_bad_input_raises_naming_the_argument(kwargs, arg):
    q = kwargs["q"]
    g = q.shape[0] // (kwargs["group_size"] or q.shape[0]) if q.shape[0] % (
        kwargs["group_size"] or q.shape[0]) == 0 else 1
    s = kwargs.get("s", np.ones((g, q.shape[1]), np.float32))
    with pytest.raises(ValueError, match=arg):
        layout.pack(jnp.asarray(q), jnp.asarray(s), kwargs.get("z"), bits=kwargs["bits"],
                    group_size=kwargs["group_size"])
