"""W8A8 / FP8 dynamic activation quantization and SmoothQuant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
import zoo
from jaxpass import passes

D, H = 64, 48


def _outlier_data(n, key):
    # A few input channels carry 30x larger activations: what breaks per-token int8.
    gain = jnp.ones(D).at[jnp.array([3, 17, 40])].set(30.0)
    return [(jax.random.normal(k, (16, D)) * gain,) for k in jax.random.split(jax.random.key(key), n)]


def _err(t, f, params, data):
    num = den = 0.0
    for (x,) in data:
        y, y0 = t(x), f(params, x)
        num += float(jnp.sum((y - y0) ** 2)); den += float(jnp.sum(y0 ** 2))
    return np.sqrt(num / den)


@pytest.mark.parametrize("fmt,bound", [("int8", 0.03), ("fp8", 0.1)])
def test_dynamic_activation_quantization_on_the_zoo(fmt, bound):
    zm = zoo.get("scan_remat_cond_custom").build()
    t = jaxpass.transform(zm.model, [passes.Quantize(weights=fmt, activations=fmt)], params=zm.params,
                          example_args=zm.example_args)
    assert all("activations" in e.detail for e in t.report[0].events_of("rewrite"))
    err = zoo.relative_error(jax.jit(t.apply)(t.params, *zm.example_args), zm.run_jit())
    assert 0 < err < bound
    assert f"activations={fmt}" in str(jax.make_jaxpr(t.apply)(t.params, *zm.example_args))
    if fmt == "int8":  # int8 x int8 products accumulated in int32, in what XLA receives
        hlo = jax.jit(t.apply).lower(t.params, *zm.example_args).as_text()
        assert "xi8>" in hlo and "xi32>" in hlo


def test_smoothquant_beats_plain_w8a8_with_outlier_channels():
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8}
    f = lambda p, x: x @ p["w"]
    calib, held = _outlier_data(8, 1), _outlier_data(4, 2)
    plain = jaxpass.transform(f, [passes.Quantize(weights="int8", activations="int8")], params=params,
                              example_args=calib[0])
    sq = jaxpass.transform(f, [passes.Quantize(weights="int8", activations="int8", method="smoothquant")],
                           params=params, example_args=calib[0], calibration_data=calib)
    assert sq.params["w"].in_scale is not None
    assert _err(sq, f, params, held) < 0.5 * _err(plain, f, params, held)


def test_activation_quantization_configuration_errors():
    with pytest.raises(jaxpass.PassError, match="pairs with weights='int8', group_size=None"):
        passes.Quantize(weights="int4", group_size=64, activations="int8")
    with pytest.raises(jaxpass.PassError, match="set activations='int8'"):
        passes.Quantize(weights="int8", method="smoothquant")
