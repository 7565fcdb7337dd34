"""Clip (range) search, AWQ's auto_clip, ragged last groups, and SmoothQuant's alpha search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.passes.quantize import QArray, quantize
from jaxpass.passes.quantize.clip import RATIOS, search_clip

K, N = 192, 48
MIX = jax.random.normal(jax.random.key(42), (K, K)) * jnp.linspace(2.0, 0.1, K)[:, None]


def _weight(key=0, shape=(K, N)):
    # Heavy-tailed weights (Student-t like): a few large entries stretch round-to-nearest scales.
    k1, k2 = jax.random.split(jax.random.key(key))
    return jax.random.normal(k1, shape) / jnp.sqrt(jax.random.gamma(k2, 1.5, shape) / 1.5) / 10


def _data(n, key=3):
    return [(jax.random.normal(k, (16, K)) @ MIX,) for k in jax.random.split(jax.random.key(key), n)]


def _out_err(t, params, f, data):
    num = den = 0.0
    for (x,) in data:
        y, y0 = t.apply(t.params, x), f(params, x)
        num += float(jnp.sum((y - y0) ** 2)); den += float(jnp.sum(y0 ** 2))
    return np.sqrt(num / den)


# -- ragged last group ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,sym", [("int4", True), ("int4", False), ("nf4", True), ("int8", True)])
def test_ragged_last_group_matches_per_group_reference(fmt, sym):
    w = _weight(shape=(576, 8))
    q = quantize(w, (0,), fmt=fmt, group_size=128, symmetric=sym)
    assert q.scale.shape == (9, 8)           # stored at gcd(576, 128) = 64
    ref = jnp.concatenate([quantize(w[s:s + 128], (0,), fmt=fmt, symmetric=sym).materialize()
                           for s in range(0, 576, 128)])   # groups of 128, 128, 128, 128, 64
    np.testing.assert_array_equal(np.asarray(q.materialize()), np.asarray(ref))
    if fmt == "int4" and sym:               # error bound: half a step of the element's group
        step = jnp.concatenate([jnp.full((128, 8), jnp.max(jnp.abs(w[s:s + 128]), 0) / 7)
                                for s in range(0, 512, 128)] + [jnp.max(jnp.abs(w[512:]), 0)[None] / 7
                                                                  * jnp.ones((64, 1))])
        assert bool(jnp.all(jnp.abs(q.materialize() - w) <= step / 2 + 1e-6))


def test_ragged_groups_is_opt_in_and_runs_through_the_pass_and_gptq():
    params = {"w": _weight(shape=(576, N))}
    f = lambda p, x: x @ p["w"]
    x = jnp.ones((4, 576))
    with pytest.raises(jaxpass.PassError, match="ragged_groups=True"):
        jaxpass.transform(f, [passes.Quantize(weights="int4", group_size=128)], params=params,
                          example_args=(x,))
    calib = [(jax.random.normal(k, (16, 576)),) for k in jax.random.split(jax.random.key(1), 4)]
    errs = {}
    for method in ("rtn", "gptq"):
        t = jaxpass.transform(f, [passes.Quantize(weights="int4", group_size=128, ragged_groups=True,
                                                  method=method)],
                              params=params, example_args=calib[0], calibration_data=calib)
        q = t.params["w"]
        assert isinstance(q, QArray) and q.scale.shape == (9, N)
        # each g128 group's scale is repeated over its gcd blocks; the ragged tail has its own
        np.testing.assert_array_equal(np.asarray(q.scale[0::2][:4]), np.asarray(q.scale[1::2][:4]))
        errs[method] = _out_err(t, params, f, calib)
        if method == "rtn":   # the rewritten matmul computes x @ (the ragged-group reference)
            ref = quantize(params["w"], (0,), fmt="int4", group_size=128).materialize()
            np.testing.assert_allclose(np.asarray(t.apply(t.params, calib[0][0])),
                                       np.asarray(calib[0][0] @ ref), rtol=1e-4, atol=1e-4)
    assert errs["gptq"] < 0.8 * errs["rtn"], errs      # GPTQ's error feedback works with them


# -- clip search --------------------------------------------------------------------------------

@pytest.mark.parametrize("group,sym", [(None, True), (64, True), (64, False), (128, True)])
def test_clip_search_never_increases_any_groups_weight_error(group, sym):
    w = _weight(shape=(576, N))
    c = search_clip(w, reduce_axes=(0,), fmt="int4", group_size=group, symmetric=sym)
    q0 = quantize(w, (0,), fmt="int4", group_size=group, symmetric=sym)
    qc = quantize(w, (0,), fmt="int4", group_size=group, symmetric=sym, clip=c)
    assert c.shape == q0.scale.shape
    assert np.all(np.min(np.abs(np.asarray(c)[..., None] - np.asarray(RATIOS)), -1) < 1e-6)
    g = group or 576
    e0 = ((w - q0.materialize()) ** 2).reshape(-1, g, N)[:576 // g].sum(1) if 576 % g == 0 else None
    ec = ((w - qc.materialize()) ** 2).reshape(-1, g, N)[:576 // g].sum(1) if 576 % g == 0 else None
    if e0 is not None:
        assert bool(jnp.all(ec <= e0 * (1 + 1e-5)))
    total0, totalc = float(jnp.sum((w - q0.materialize()) ** 2)), float(jnp.sum((w - qc.materialize()) ** 2))
    assert totalc < 0.97 * total0, (totalc, total0)     # heavy tails: shrinking pays
    # the clipped range bounds the error of saturated weights: |w - q| <= (1 - r) max|w| + step/2
    if group == 64 and sym:
        amax = jnp.repeat(jnp.max(jnp.abs(w).reshape(9, 64, N), 1), 64, 0)
        r = jnp.repeat(c, 64, 0)
        assert bool(jnp.all(jnp.abs(w - qc.materialize()) <= (1 - r) * amax + r * amax / 7 / 2 + 1e-6))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_clip_search_option_of_the_pass_lowers_output_error(method):
    params = {"w": _weight()}
    f = lambda p, x: x @ p["w"]
    calib, held_out = _data(8), _data(4, key=9)
    kw = dict(weights="int4", group_size=64, method=method)
    base = jaxpass.transform(f, [passes.Quantize(**kw)], params=params, example_args=calib[0],
                             calibration_data=calib)
    clip = jaxpass.transform(f, [passes.Quantize(**kw, clip_search=True)], params=params,
                             example_args=calib[0], calibration_data=calib)
    assert any("clip_search" in n for n in clip.report[0].notes)
    assert clip.params["w"].scale.shape == base.params["w"].scale.shape
    e0, e1 = _out_err(base, params, f, held_out), _out_err(clip, params, f, held_out)
    assert e1 < 0.97 * e0, (e1, e0)
    assert e1 < 0.2          # int4 g64 on heavy-tailed weights: ~0.18 relative output error


# -- AWQ with auto_clip -------------------------------------------------------------------------

def test_awq_with_clip_beats_round_to_nearest_and_awq_without_clip():
    params = {"w": _weight()}
    f = lambda p, x: x @ p["w"]
    calib, held_out = _data(16), _data(8, key=9)
    q = dict(weights="int4", group_size=64)
    rtn = jaxpass.transform(f, [passes.Quantize(**q)], params=params, example_args=calib[0])
    awq = jaxpass.transform(f, [passes.Quantize(**q, method="awq")], params=params,
                            example_args=calib[0], calibration_data=calib)
    no_clip = jaxpass.transform(f, [passes.Quantize(**q, method="awq", clip_search=False)],
                                params=params, example_args=calib[0], calibration_data=calib)
    assert any("clip search on" in n for n in awq.report[0].notes)
    assert awq.params["w"].in_scale is not None
    e_rtn, e_awq, e_nc = (_out_err(t, params, f, d) for t, d in
                          ((rtn, calib), (awq, calib), (no_clip, calib)))
    assert e_awq <= e_rtn and e_awq <= e_nc * 1.001, (e_awq, e_nc, e_rtn)
    h_rtn, h_awq = _out_err(rtn, params, f, held_out), _out_err(awq, params, f, held_out)
    assert h_awq < 0.9 * h_rtn, (h_awq, h_rtn)
    assert h_awq < 0.2          # int4 g64, heavy-tailed weights (RTN: ~0.2)


def test_awq_clip_search_uses_the_output_error_criterion():
    # With inputs concentrated on a few channels, the output-error clip differs from the
    # weight-error one and gives a lower output error on those inputs.
    w = _weight(shape=(128, N))
    x = jax.random.normal(jax.random.key(5), (256, 128)) * jnp.where(jnp.arange(128) < 8, 10.0, 0.1)
    kw = dict(reduce_axes=(0,), fmt="int4", group_size=64, symmetric=True)
    c_out, c_w = search_clip(w, x, **kw), search_clip(w, **kw)
    err = lambda c: float(jnp.sum((x @ (w - quantize(w, (0,), fmt="int4", group_size=64, clip=c)
                                        .materialize())) ** 2))
    assert err(c_out) <= err(c_w) and err(c_out) <= err(None)
    assert not bool(jnp.all(c_out == c_w))


# -- SmoothQuant alpha search -------------------------------------------------------------------

def test_smoothquant_auto_alpha_is_no_worse_than_the_default_on_calibration_data():
    scale = jnp.where(jnp.arange(K) % 17 == 0, 30.0, 1.0)        # activation outlier channels
    calib = [(x * scale,) for (x,) in _data(8)]
    params = {"w": _weight()}
    f = lambda p, x: x @ p["w"]
    kw = dict(weights="int8", activations="int8", method="smoothquant")
    half = jaxpass.transform(f, [passes.Quantize(**kw)], params=params, example_args=calib[0],
                             calibration_data=calib)
    auto = jaxpass.transform(f, [passes.Quantize(**kw, alpha="auto")], params=params,
                             example_args=calib[0], calibration_data=calib)
    assert any("alpha searched per weight" in n for n in auto.report[0].notes)
    e_half, e_auto = _out_err(half, params, f, calib), _out_err(auto, params, f, calib)
    assert e_auto <= e_half * 1.0001, (e_auto, e_half)
    assert e_auto < 0.02


def test_bad_clip_and_alpha_options_are_refused():
    with pytest.raises(jaxpass.PassError, match="alpha=1.5"):
        passes.Quantize(weights="int8", activations="int8", method="smoothquant", alpha=1.5)
    with pytest.raises(jaxpass.PassError, match="clip_search=True"):
        passes.Quantize(weights="int8", activations="int8", method="smoothquant", clip_search=True)


def test_smoothquant_with_gptq_weights_lowers_the_w8a8_output_error():
    scale = jnp.where(jnp.arange(K) % 17 == 0, 30.0, 1.0)
    calib = [(x * scale,) for (x,) in _data(8)]
    held_out = [(x * scale,) for (x,) in _data(4, key=9)]
    params = {"w": _weight()}
    f = lambda p, x: x @ p["w"]
    kw = dict(weights="int8", activations="int8", method="smoothquant")
    rtn = jaxpass.transform(f, [passes.Quantize(**kw)], params=params, example_args=calib[0],
                            calibration_data=calib)
    gq = jaxpass.transform(f, [passes.Quantize(**kw, smooth_gptq=True)], params=params,
                           example_args=calib[0], calibration_data=calib)
    np.testing.assert_array_equal(np.asarray(gq.params["w"].in_scale), np.asarray(rtn.params["w"].in_scale))
    e_rtn, e_gq = _out_err(rtn, params, f, held_out), _out_err(gq, params, f, held_out)
    assert e_gq < e_rtn and e_gq < 0.02, (e_gq, e_rtn)
    with pytest.raises(jaxpass.PassError, match="smooth_gptq"):
        passes.Quantize(weights="int8", method="gptq", smooth_gptq=True)
