"""Decode-attention kernels in Pallas interpret mode against the f32 reference that reads the same
dequantized cache (so the comparison is tight: only f32 summation order differs), plus the XLA
path, the selection logic and the quantization error of each format against the dense cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas import decode_attention as DA
from jaxpass.kernels_pallas.decode_attention import formats as F

B, KVH, G, L, D = 2, 2, 3, 128, 64         # GQA: 6 query heads over 2 KV heads (padded to 16 rows)
SCALE = D ** -0.5
CFG = DA.DecodeConfig(block_k=32, num_splits=2)
KINDS = {
    "dense": ("dense", {}),
    "int8": ("int8", {}),
    "kivi4": ("kivi", dict(bits=4, group_size=16, residual=32)),
    "kivi2": ("kivi", dict(bits=2, group_size=16, residual=32, v_group_size=16)),
    # 16 packed bytes per row, value groups of 32 channels: each group spans two planes
    "kivi2g32": ("kivi", dict(bits=2, group_size=16, residual=32, v_group_size=32)),
    "sparse": ("sparse", dict(sparsity=0.5)),
}


def _data(dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    k = (jax.random.normal(k1, (B, KVH, L, D)) * 1.5 + 0.3).astype(dtype)
    v = jax.random.normal(k2, (B, KVH, L, D)).astype(dtype)
    q = jax.random.normal(k3, (B, KVH * G, D)).astype(dtype)
    return q, k, v


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["dense", "kivi4", "sparse", "kivi2g32",
                                  pytest.param("int8", marks=pytest.mark.slow),
                                  pytest.param("kivi2", marks=pytest.mark.slow)])
def test_triton_kernel_matches_reference_f32(name):
    kind, opts = KINDS[name]
    q, k, v = _data(jnp.float32)
    lens = jnp.array([L - 9, 37])                                    # ragged, not block aligned
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton", config=CFG,
                              interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) < 2e-6
    assert float(jnp.max(jnp.abs(ref))) > 0.05                       # not a degenerate case


@pytest.mark.parametrize("name", [pytest.param("dense", marks=pytest.mark.slow),
                                  pytest.param("int8", marks=pytest.mark.slow),
                                  pytest.param("kivi4", marks=pytest.mark.slow),
                                  pytest.param("kivi2", marks=pytest.mark.slow),
                                  pytest.param("sparse", marks=pytest.mark.slow)])
def test_triton_kernel_matches_reference_bf16(name):
    """16-bit queries take the magic-number decode paths (int8 as f16 1152 + q, KIVI codes as
    bf16 128 + c) whose biases must cancel exactly."""
    kind, opts = KINDS[name]
    q, k, v = _data(jnp.bfloat16, seed=1)
    lens = jnp.array([1, L])                                         # a one-token row
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton", config=CFG,
                              interpret=True)
    # bf16 output rounding (2**-9 relative, ~1.6e-3 in norm here) plus bf16 p in the p @ v dot;
    # a bias that failed to cancel would be off by > 10%
    assert _rel(out, ref) < 5e-3
    # the one-token row returns that token's value exactly up to the bf16 output
    _, vv = cache.dequantize(lens)
    np.testing.assert_allclose(np.asarray(out[0], np.float32),
                               np.repeat(np.asarray(vv[0, :, 0]), G, axis=0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name,dtype,tol", [
    ("kivi4", jnp.float32, 2e-6), ("kivi4", jnp.bfloat16, 6e-3), ("kivi2g32", jnp.float32, 2e-6),
    pytest.param("kivi2", jnp.bfloat16, 6e-3, marks=pytest.mark.slow)])
def test_kivi_block_dequant_variant_matches_reference(name, dtype, tol):
    """``kivi_block=1``: keys dequantized per block (group scale rows broadcast to their tokens,
    two groups per step here), one key dot per plane; bf16 keys round the dequantized values
    (2**-9 relative, under the bf16 output's own rounding)."""
    kind, opts = KINDS[name]
    q, k, v = _data(dtype, seed=2)
    lens = jnp.array([L - 9, 37])
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    run = lambda kb: DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton",
                                         config=DA.DecodeConfig(32, 2, kivi_block=kb), interpret=True)
    err = _rel(run(1), ref)
    if dtype == jnp.float32:
        assert err < tol
    else:   # the bf16 output's rounding dominates; the extra key rounding adds at most 20%
        base = _rel(run(0), ref)
        assert err < 1.2 * base < tol
        # 16-bit dequantization arithmetic: scale, min and the product rounded to bf16 (~2**-9
        # each per key, against KIVI's own ~1/15-of-range quantization step); a wrong bias or
        # scale row would be off by > 10%
        assert _rel(run(2), ref) < 2 * base
    # 3: scales on the query side (as 0), one dot per plane for all groups of a step; the same
    # roundings as 0 in another order
    err3 = _rel(run(3), ref)
    assert err3 < tol if dtype == jnp.float32 else err3 < 1.2 * _rel(run(0), ref)


def test_int8_bf16_per_head_lengths_and_split_skipping():
    """16-bit int8 path (codes decoded as f16 1152 + q; the bias must cancel exactly) with
    per-head lengths, one of them ending inside the first split (the second is skipped)."""
    q, k, v = _data(jnp.bfloat16, seed=2)
    lens = jnp.array([[L, 3], [64, 65]])                             # per (row, KV head)
    cache = F.from_dense("int8", k, v, lengths=lens)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton", config=CFG,
                              interpret=True)
    assert _rel(out, ref) < 5e-3            # bf16 output rounding is ~1.6e-3 in norm here



@pytest.mark.parametrize("name,kivi_block", [("int8", 0), ("kivi2", 1),
                                             pytest.param("kivi4", 0, marks=pytest.mark.slow),
                                             pytest.param("sparse", 0, marks=pytest.mark.slow)])
def test_sinks_are_read_from_their_full_precision_rows(name, kivi_block):
    """``sinks=(k, v)``: positions [0, S) come from the given rows on every backend. The
    reference equals plain attention over the dequantized cache with those rows replaced
    (a dense f32 cache); the kernel (interpret) and the XLA path equal the reference. Row 1 is
    shorter than S (sink rows past the length stay unread, KIVI's ring holds positions < S)."""
    kind, opts = KINDS[name]
    q, k, v = _data(jnp.float32, seed=3)
    S = 4
    lens = jnp.array([L - 9, 3])
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    sinks = (k[:, :, :S] + 0.5, v[:, :, :S] - 0.25)     # not the format's rows: a visible change
    kd, vd = cache.dequantize(lens)
    dense = F.from_dense("dense", kd.at[:, :, :S].set(sinks[0]), vd.at[:, :, :S].set(sinks[1]))
    want = DA.reference_decode_attention(q, dense, lens, scale=SCALE)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE, sinks=sinks)
    assert _rel(ref, want) < 1e-6
    assert _rel(DA.reference_decode_attention(q, cache, lens, scale=SCALE), want) > 1e-2
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton", interpret=True,
                              config=DA.DecodeConfig(32, 2, kivi_block=kivi_block), sinks=sinks)
    assert _rel(out, ref) < 2e-6
    xla = DA.decode_attention(q, cache, lens, scale=SCALE, backend="xla", sinks=sinks)
    assert _rel(xla, ref) < 1e-5
    with pytest.raises(ValueError, match="sinks"):
        DA.decode_attention(q, cache, lens, scale=SCALE, backend="xla", sinks=(sinks[0], k))


@pytest.mark.parametrize("name", list(KINDS))
def test_xla_path_matches_reference(name):
    kind, opts = KINDS[name]
    q, k, v = _data(jnp.bfloat16, seed=3)
    lens = jnp.array([L - 1, 50])
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="xla")
    assert _rel(out, ref) < 1e-2


def test_sparse_reference_and_xla_agree():
    q, k, v = _data(jnp.float32, seed=4)
    lens = jnp.array([L, 20])
    cache = F.from_dense("sparse", k, v, sparsity=0.5)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    assert _rel(DA.decode_attention(q, cache, lens, scale=SCALE, backend="xla"), ref) < 1e-5


def test_quantization_error_against_dense_cache():
    """Each format's output error vs exact attention, on random data: a sanity bound that catches
    a format that is numerically off (wrong scale axis, wrong zero point)."""
    q, k, v = _data(jnp.float32, seed=5)
    lens = jnp.array([L, 90])
    exact = DA.reference_decode_attention(q, F.from_dense("dense", k, v), lens, scale=SCALE)
    bounds = {"int8": 0.02, "kivi4": 0.2, "kivi2": 0.7}
    errs = {}
    for name, bound in bounds.items():
        kind, opts = KINDS[name]
        cache = F.from_dense(kind, k, v, lengths=lens, **opts)
        errs[name] = _rel(DA.reference_decode_attention(q, cache, lens, scale=SCALE), exact)
        assert errs[name] < bound, errs
    assert errs["int8"] < errs["kivi4"] < errs["kivi2"]


def test_tuned_table_routes_to_the_measured_winner():
    """tuned_configs.json: XLA was faster for dense at 4K on the H100, the kernel at 32K."""
    q = jax.ShapeDtypeStruct((8, 32, 128), jnp.bfloat16)
    short = F.init("dense", 8, 8, 4096, 128)
    long = F.init("dense", 8, 8, 32768, 128)
    assert DA.select_implementation(q.shape, q.dtype, short, platform="gpu").backend == "xla"
    sel = DA.select_implementation(q.shape, q.dtype, long, platform="gpu")
    assert sel.backend == "triton" and "tuned" in sel.reason


@pytest.mark.parametrize("name", ["int8", "kivi4"])
def test_split_count_need_not_divide_the_capacity(name):
    """3 splits of a 128-row cache in 32-row steps: splits of 64, 64 and 0 rows (rounded up to
    whole steps), ragged lengths ending inside the second split and inside the first."""
    kind, opts = KINDS[name]
    q, k, v = _data(jnp.float32, seed=4)
    lens = jnp.array([L - 5, 50])
    cache = F.from_dense(kind, k, v, lengths=lens, **opts)
    ref = DA.reference_decode_attention(q, cache, lens, scale=SCALE)
    out = DA.decode_attention(q, cache, lens, scale=SCALE, backend="triton", interpret=True,
                              config=DA.DecodeConfig(block_k=32, num_splits=3,
                                                     kivi_block=int(kind == "kivi")))
    assert _rel(out, ref) < 2e-6


def test_selection_reasons_and_errors():
    q, k, v = _data(jnp.bfloat16)
    dense = F.from_dense("dense", k, v)
    sel = DA.select_implementation(q.shape, q.dtype, dense, platform="cpu")
    assert sel.backend == "xla" and "cpu" in sel.reason
    sel = DA.select_implementation(q.shape, q.dtype, dense, platform="gpu")
    assert sel.backend == "triton" and sel.config is not None
    sparse = F.from_dense("sparse", k, v)
    sel = DA.select_implementation(q.shape, q.dtype, sparse, platform="gpu")
    assert sel.backend == "triton" and sel.config is not None
    with pytest.raises(ValueError, match="block_k=256"):     # capacity 128 is not a multiple
        DA.decode_attention(q, dense, jnp.array([L, L]), scale=SCALE, backend="triton",
                            config=DA.DecodeConfig(block_k=256, num_splits=1), interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
        DA.decode_attention(q, dense, jnp.array([L, L]), scale=SCALE, backend="triton",
                            config=DA.DecodeConfig(block_k=32, num_splits=0), interpret=True)
    with pytest.raises(ValueError, match="query heads"):
        DA.decode_attention(q[:, :5], dense, jnp.array([L, L]), scale=SCALE, backend="xla")
    with pytest.raises(ValueError, match="backend"):
        DA.decode_attention(q, dense, jnp.array([L, L]), scale=SCALE, backend="mosaic")
