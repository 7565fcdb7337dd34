"""Every weight format: exact packing, error bounds per element and per output, stacked weights."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
import zoo
from jaxpass import passes
from jaxpass.passes.quantize import NF4_CODEBOOK, QArray, quantize
from jaxpass.passes.quantize.qarray import expand, pack_nibbles, unpack_nibbles

W = jax.random.normal(jax.random.key(0), (4, 64, 48))  # a stacked [L, K, N] weight

CONFIGS = [("int8", None, True), ("int8", None, False), ("int8", 16, True), ("int4", None, True),
           ("int4", 16, True), ("int4", 16, False), ("int4", 32, False), ("nf4", 16, True),
           ("nf4", None, True), ("fp8", None, True), ("fp8", 16, True)]


@pytest.mark.parametrize("fmt,group,sym", CONFIGS)
def test_elementwise_error_is_within_half_a_step(fmt, group, sym):
    q = quantize(W, (1,), fmt=fmt, group_size=group, symmetric=sym)
    assert q.shape == W.shape
    groups = 1 if group is None else 64 // group
    assert q.scale.shape == (4, groups, 48) and (q.zero is None) == sym
    if fmt in ("int4", "nf4"):
        assert q.qvalue.shape == (4, 32, 48) and q.qvalue.dtype == jnp.uint8  # two codes per byte
    err = np.abs(np.asarray(q.materialize()) - np.asarray(W))
    step = np.asarray(expand(q.scale, W.shape))
    if fmt in ("int8", "int4"):
        assert np.all(err <= step / 2 + 1e-6)
    elif fmt == "nf4":  # half the widest gap between neighbouring codebook values
        assert np.all(err <= step * np.max(np.diff(NF4_CODEBOOK)) / 2 + 1e-6)
    else:  # fp8 e4m3: 3 mantissa bits, relative rounding error <= 2^-4
        assert np.all(err <= np.abs(np.asarray(W)) * 2.0 ** -4 + step * 2.0 ** -9 + 1e-7)


def test_nibble_packing_round_trips_exactly():
    rng = np.random.default_rng(0)
    for signed, (lo, hi) in ((True, (-8, 8)), (False, (0, 16))):
        c = jnp.asarray(rng.integers(lo, hi, (6, 10, 4)), jnp.int8)
        for axis in (0, 1, -2):
            packed = pack_nibbles(c, axis)
            assert packed.dtype == jnp.uint8 and packed.shape[axis] == c.shape[axis] // 2
            np.testing.assert_array_equal(unpack_nibbles(packed, axis, signed=signed), c)
    # Byte layout: element 2i in the low nibble, 2i+1 in the high nibble.
    assert int(pack_nibbles(jnp.array([1, 2], jnp.int8), 0)[0]) == 0x21


@pytest.mark.parametrize("fmt,group,sym", CONFIGS)
def test_transform_formats_on_a_scan_over_stacked_layers(fmt, group, sym):
    zm = zoo.get("scan_remat_cond_custom").build()
    group = None if group is None else 4  # the zoo's weights are 8 wide
    t = jaxpass.transform(zm.model, [passes.Quantize(weights=fmt, group_size=group, symmetric=sym)],
                          params=zm.params, example_args=zm.example_args)
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        t.params, is_leaf=lambda x: isinstance(x, QArray))[0]}
    assert {p for p, x in leaves.items() if isinstance(x, QArray)} == set(zm.weight_paths)
    bound = {"int8": 0.02, "fp8": 0.08, "int4": 0.25, "nf4": 0.25}[fmt]
    err = zoo.relative_error(jax.jit(t.apply)(t.params, *zm.example_args), zm.run_jit())
    assert err <= bound, err
    assert t.graph.count("jaxpass.quantized_dot_general") >= 1
    # The reference meaning: running the original program on dequantized weights.
    deq = zm.replace_leaves({p: leaves[p].materialize() for p in zm.weight_paths})
    np.testing.assert_allclose(jax.jit(t.apply)(t.params, *zm.example_args), deq.run_jit(),
                               rtol=2e-4, atol=2e-5)


def test_group_and_int4_through_transposed_hf_style_weights():
    zm = zoo.get("hf_llama").build()
    t = jaxpass.transform(zm.model, [passes.Quantize(weights="int4", group_size=8)],
                          params=zm.params, example_args=zm.example_args)
    assert not t.report[0].events_of("materialize") or all(
        "gather" in e.op for e in t.report[0].events_of("materialize"))
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        t.params, is_leaf=lambda x: isinstance(x, QArray))[0]}
    deq = zm.replace_leaves({p: leaves[p].materialize() for p in zm.weight_paths})
    np.testing.assert_allclose(jax.jit(t.apply)(t.params, *zm.example_args), deq.run_jit(),
                               rtol=1e-3, atol=1e-3)


def test_asymmetric_min_max_reproduces_q4_1_style_blocks_exactly():
    # llama.cpp Q4_1: per block of 32 inputs, w = d * q + m with q in [0, 15] (each block uses
    # its full code range). Asymmetric int4 with group 32 along that axis must give it back.
    rng = np.random.default_rng(0)
    k, n = 128, 16
    q = rng.integers(0, 16, (k, n)); q[0::32] = 0; q[1::32] = 15
    d = rng.uniform(0.01, 0.1, (k // 32, n)); m = rng.uniform(-0.5, 0.2, (k // 32, n))
    w = jnp.asarray(np.repeat(d, 32, 0) * q + np.repeat(m, 32, 0), jnp.float32)
    out = quantize(w, (0,), fmt="int4", group_size=32, symmetric=False)
    np.testing.assert_allclose(out.materialize(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["linen_scan_remat", "hf_gpt2"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_third_party_models_int8_and_int4(name, fmt):
    zm = zoo.get(name).build()
    q = passes.Quantize(weights=fmt, group_size=None if fmt == "int8" else 8)
    t = jaxpass.transform(zm.model, [q], params=zm.params, example_args=zm.example_args)
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        t.params, is_leaf=lambda x: isinstance(x, QArray))[0]}
    assert {p for p, x in leaves.items() if isinstance(x, QArray)} == set(zm.weight_paths)
    out = jax.jit(t.apply)(t.params, *zm.example_args)
    assert zoo.relative_error(out, zm.run_jit()) <= (zm.int8_rtol if fmt == "int8" else 0.3)
    deq = zm.replace_leaves({p: leaves[p].materialize() for p in zm.weight_paths})
    np.testing.assert_allclose(out, deq.run_jit(), rtol=1e-3, atol=1e-3)
