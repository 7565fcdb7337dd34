"""KV cache formats (jaxpass/kernels_pallas/decode_attention/formats.py): round trips, error bounds
from each quantizer's step, append == bulk construction, pytree behaviour, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas.decode_attention import formats as F

B, H, T, D = 2, 2, 40, 32
KIVI = dict(group_size=8, residual=16, v_group_size=16)


def _kv(t=T, d=D, dtype=jnp.float32, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    k = 1.0 + jax.random.normal(k1, (B, H, t, d), jnp.float32) * 2.0   # non-zero mean: asym matters
    v = jax.random.normal(k2, (B, H, t, d), jnp.float32)
    return k.astype(dtype), v.astype(dtype)


def test_pack_planar_round_trip():
    for bits in (2, 4):
        codes = jax.random.randint(jax.random.PRNGKey(bits), (3, 5, D), 0, 1 << bits).astype(jnp.uint8)
        packed = F.pack_planar(codes, bits)
        assert packed.shape == (3, 5, D * bits // 8) and packed.dtype == jnp.uint8
        np.testing.assert_array_equal(F.unpack_planar(packed, bits), codes)


def test_dense_round_trip_and_append():
    k, v = _kv(dtype=jnp.bfloat16)
    c = F.from_dense("dense", k, v, capacity=64)
    kk, vv = c.dequantize()
    assert kk.shape == (B, H, 64, D) and c.nbytes == 2 * B * H * 64 * D * 2
    np.testing.assert_array_equal(kk[:, :, :T], k)
    # append one token per row at different positions, per-row positions
    kn, vn = _kv(t=1, dtype=jnp.bfloat16, seed=3)
    c2 = c.append(kn, vn, jnp.array([T, 5]))
    np.testing.assert_array_equal(c2.k[0, :, T], kn[0, :, 0])
    np.testing.assert_array_equal(c2.k[1, :, 5], kn[1, :, 0])
    np.testing.assert_array_equal(c2.k[1, :, T], c.k[1, :, T])


def test_int8_error_within_half_step():
    k, v = _kv()
    c = F.from_dense("int8", k, v)
    assert c.k_q.dtype == jnp.int8 and c.k_scale.shape == (B, H, T)
    kk, vv = c.dequantize()
    for x, xx, s in ((k, kk, c.k_scale), (v, vv, c.v_scale)):
        err = jnp.abs(xx - x)
        assert float(jnp.max(err - 0.5 * s[..., None] * 1.0001)) <= 1e-6
        assert float(jnp.max(err)) > 0                                  # really quantized
    assert c.nbytes == 2 * B * H * T * (D + 4)


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_bounds_and_ring(bits):
    k, v = _kv()
    lens = jnp.array([T, 29])
    c = F.from_dense("kivi", k, v, lengths=lens, bits=bits, **KIVI)
    G, R = KIVI["group_size"], KIVI["residual"]
    assert c.k_codes.shape == (B, H, T, D * bits // 8)
    assert c.k_scale.shape == (B, H, T // G, D) and c.v_scale.shape == (B, H, T, D // 16)
    kk, vv = c.dequantize(lens)
    nq = F.quantized_length(lens, G, R)
    np.testing.assert_array_equal(nq, [24, 16])
    for r in range(B):
        n, q = int(lens[r]), int(nq[r])
        # quantized part: within half a step of its group's (per-channel) / token's scale
        ks = jnp.repeat(c.k_scale[r], G, axis=-2)[:, :q]
        assert float(jnp.max(jnp.abs(kk[r, :, :q] - k[r, :, :q]) - 0.5001 * ks)) <= 1e-5
        vs = jnp.repeat(c.v_scale[r], 16, axis=-1)[:, :q]
        assert float(jnp.max(jnp.abs(vv[r, :, :q] - v[r, :, :q]) - 0.5001 * vs)) <= 1e-5
        # residual part: exact; past the length: zero
        np.testing.assert_array_equal(kk[r, :, q:n], k[r, :, q:n])
        np.testing.assert_array_equal(vv[r, :, q:n], v[r, :, q:n])
        assert float(jnp.sum(jnp.abs(kk[r, :, n:]))) == 0.0
        assert 0 < n - q <= R


def test_kivi_token_by_token_equals_bulk_per_head_lengths():
    t_max = 24                                                          # crosses R=16 by a group
    k, v = _kv(t=t_max, dtype=jnp.bfloat16)
    lens = jnp.array([[t_max, 19], [9, 1]])                             # per-head lengths
    opts = dict(bits=2, **KIVI)

    @jax.jit
    def step(c, kn, vn, t):
        """Appends token t to the heads whose length is above t; the others keep their state."""
        c2 = c.append(kn, vn, jnp.full((B, H), t, jnp.int32))
        live = t < lens
        return jax.tree.map(
            lambda a, b_: jnp.where(live.reshape(live.shape + (1,) * (a.ndim - 2)), b_, a), c, c2)

    c = F.init("kivi", B, H, t_max, D, jnp.bfloat16, **opts)
    for t in range(t_max):
        c = step(c, k[:, :, t:t + 1], v[:, :, t:t + 1], t)
    bulk = F.from_dense("kivi", k, v, lengths=lens, **opts)
    for a, b_ in zip(c.dequantize(lens), bulk.dequantize(lens)):
        np.testing.assert_array_equal(a, b_)
    # the chunked append (T > 1, crossing several groups) agrees too
    half = F.from_dense("kivi", k[:, :, :11], v[:, :, :11], capacity=t_max, **opts)
    chunk = half.append(k[:, :, 11:], v[:, :, 11:], jnp.full((B,), 11, jnp.int32))
    full = F.from_dense("kivi", k, v, **opts)
    n = jnp.full((B,), t_max)
    for a, b_ in zip(chunk.dequantize(n), full.dequantize(n)):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("bits,G,R,gv,cap", [(4, 8, 16, 8, 96), (2, 16, 32, 16, 128),
                                              (4, 8, 8, 32, 64)])
def test_kivi_decode_append_equals_general_append(bits, G, R, gv, cap):
    """The one-token decode append (ring row + a group flushed under lax.cond) leaves every array
    bit-identical to the general window append, at ragged per-head positions, across flushes and
    past the capacity (writes dropped)."""
    k0, v0 = _kv(t=24)
    c = F.KiviKV.init(B, H, cap, D, jnp.float32, bits=bits, group_size=G, v_group_size=gv,
                      residual=R)
    pos = np.array([[5, 40], [0, 33]], np.int32)
    c = c.append(k0, v0, jnp.asarray(pos))
    pos = pos + 24
    fast, general = jax.jit(F.KiviKV._append_token), jax.jit(F.KiviKV._append_general)
    kn, vn = _kv(t=45, seed=1)
    for i in range(45):           # row (0, 1) runs from 64 past cap = 64 / 96 / 128 in places
        args = (kn[:, :, i:i + 1], vn[:, :, i:i + 1], jnp.asarray(pos))
        a, b_ = fast(c, *args), general(c, *args)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b_)):
            np.testing.assert_array_equal(x, y)
        c, pos = a, pos + 1


def test_sparse_keeps_top_magnitudes():
    k, v = _kv(dtype=jnp.bfloat16)
    c = F.from_dense("sparse", k, v, sparsity=0.7)
    keep = F.keep_count(D, 0.7)
    assert c.keep == keep == 10 and c.k_bitmap.shape == (B, H, T, D // 8)
    kk, _ = c.dequantize()
    mask = F.bitmap_mask(c.k_bitmap)
    np.testing.assert_array_equal(jnp.sum(mask, -1), keep)
    kf = k.astype(jnp.float32)
    np.testing.assert_array_equal(jnp.where(mask, kf, 0.0), kk)         # kept entries exact
    kept_min = jnp.min(jnp.where(mask, jnp.abs(kf), jnp.inf), -1)
    dropped_max = jnp.max(jnp.where(mask, 0.0, jnp.abs(kf)), -1)
    assert bool(jnp.all(dropped_max <= kept_min))


def test_caches_are_pytrees_and_loop_carries():
    k, v = _kv(dtype=jnp.bfloat16)
    for kind, opts in (("dense", {}), ("int8", {}), ("kivi", KIVI), ("sparse", {})):
        c = F.init(kind, B, H, 64, D, jnp.bfloat16, **opts)

        def body(i, c):
            return c.append(jax.lax.dynamic_slice_in_dim(k, i, 1, 2),
                            jax.lax.dynamic_slice_in_dim(v, i, 1, 2), jnp.full((B,), i))

        out = jax.jit(lambda c: jax.lax.fori_loop(0, T, body, c))(c)
        assert type(out) is type(c)
        ref = F.from_dense(kind, k, v, capacity=64, **opts)
        lens = jnp.full((B,), T)
        for a, b_ in zip(out.dequantize(lens), ref.dequantize(lens)):
            np.testing.assert_array_equal(a, b_)


def test_append_past_capacity_is_dropped():
    k, v = _kv(dtype=jnp.bfloat16)
    c = F.from_dense("int8", k, v)
    kn, vn = _kv(t=2, dtype=jnp.bfloat16, seed=5)
    c2 = c.append(kn, vn, jnp.array([T - 1, T - 1]))
    assert c2.k_q.shape == c.k_q.shape
    np.testing.assert_array_equal(c2.k_q[:, :, :T - 1], c.k_q[:, :, :T - 1])


def test_errors_name_the_problem():
    k, v = _kv()
    with pytest.raises(ValueError, match="kind must be one of"):
        F.from_dense("int3", k, v)
    with pytest.raises(ValueError, match="bits must be 2 or 4"):
        F.from_dense("kivi", k, v, bits=3, **KIVI)
    with pytest.raises(ValueError, match="residual"):
        F.init("kivi", B, H, 64, D, group_size=32, residual=48)
    with pytest.raises(ValueError, match="equal shape"):
        F.from_dense("dense", k, v[..., :16])
    with pytest.raises(ValueError, match="positions"):
        F.init("dense", B, H, 64, D).append(k, v, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="sparsity"):
        F.init("sparse", B, H, 64, D, sparsity=1.0)
