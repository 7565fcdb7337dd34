"""GPTQ: lower layer-output error than round-to-nearest on the calibration distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxpass
from jaxpass import passes
from jaxpass.passes.quantize import QArray

D, H = 64, 96


MIX = jax.random.normal(jax.random.key(42), (D, D)) * jnp.linspace(2.0, 0.1, D)[:, None]


def _data(n, key=3):
    # Correlated inputs with a few dominant channels (one fixed distribution; ``key`` draws the
    # samples): where GPTQ's error feedback pays off.
    return [(jax.random.normal(k, (8, D)) @ MIX,) for k in jax.random.split(jax.random.key(key), n)]


def _layer_err(t, params, f, data):
    num = den = 0.0
    for (x,) in data:
        y, y0 = t.apply(t.params, x), f(params, x)
        num += float(jnp.sum((y - y0) ** 2)); den += float(jnp.sum(y0 ** 2))
    return np.sqrt(num / den)


@pytest.mark.parametrize("weights,group", [("int4", 16), ("int4", None)])
def test_gptq_beats_round_to_nearest_on_held_out_data(weights, group):
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8,
              "v": jax.random.normal(jax.random.key(1), (H, D)) / 10}     # used as x @ v.T
    f = lambda p, x: x @ p["w"] + (x @ p["v"].T).sum() * 0
    calib, held_out = _data(16), _data(8, key=9)
    rtn = jaxpass.transform(f, [passes.Quantize(weights=weights, group_size=group)], params=params,
                            example_args=calib[0])
    gptq = jaxpass.transform(f, [passes.Quantize(weights=weights, group_size=group, method="gptq")],
                             params=params, example_args=calib[0], calibration_data=calib)
    assert isinstance(gptq.params["w"], QArray)
    assert gptq.params["w"].scale.shape == rtn.params["w"].scale.shape  # same layout, new codes
    e_rtn, e_gptq = _layer_err(rtn, params, f, held_out), _layer_err(gptq, params, f, held_out)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert any("GPTQ: Hessians from 16" in n for n in gptq.report[0].notes)


def test_gptq_per_layer_hessians_for_scan_stacked_weights():
    params = {"w": jax.random.normal(jax.random.key(0), (3, D, D)) / 8}
    f = lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    calib, held_out = _data(12), _data(6, key=5)
    rtn = jaxpass.transform(f, [passes.Quantize(weights="int4", group_size=16)], params=params,
                            example_args=calib[0])
    gptq = jaxpass.transform(f, [passes.Quantize(weights="int4", group_size=16, method="gptq")],
                             params=params, example_args=calib[0], calibration_data=calib)
    assert gptq.params["w"].qvalue.shape == (3, D // 2, D)
    assert _layer_err(gptq, params, f, held_out) < _layer_err(rtn, params, f, held_out)


def test_gptq_without_calibration_or_with_wrong_shapes_is_refused():
    params = {"w": jnp.ones((D, H))}
    f = lambda p, x: x @ p["w"]
    with pytest.raises(jaxpass.PassError, match="needs calibration data"):
        jaxpass.transform(f, [passes.Quantize(weights="int4", method="gptq")], params=params,
                          example_args=(jnp.ones((8, D)),))
    with pytest.raises(jaxpass.PassError, match=r"calibration_data\[0\]\[0\] is float32\[4, 64\]"):
        jaxpass.transform(f, [passes.Quantize(weights="int4", method="gptq")], params=params,
                          example_args=(jnp.ones((8, D)),), calibration_data=[(jnp.ones((4, D)),)])


def test_awq_beats_round_to_nearest_and_stores_input_scales():
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8}
    f = lambda p, x: x @ p["w"]
    calib, held_out = _data(16), _data(8, key=9)
    q = dict(weights="int4", group_size=16)
    rtn = jaxpass.transform(f, [passes.Quantize(**q)], params=params, example_args=calib[0])
    awq = jaxpass.transform(f, [passes.Quantize(**q, method="awq")], params=params,
                            example_args=calib[0], calibration_data=calib)
    w = awq.params["w"]
    assert w.in_scale is not None and w.in_scale.shape == (D, 1)
    assert _layer_err(awq, params, f, held_out) < _layer_err(rtn, params, f, held_out)
    # The program is the matmul of the dequantized (input-scaled) weight.
    np.testing.assert_allclose(awq(held_out[0][0]), held_out[0][0] @ w.materialize(), rtol=2e-4, atol=2e-4)
