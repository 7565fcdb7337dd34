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


def test_static_activation_scales_are_calibrated_per_matmul_and_per_layer(tmp_path):
    from jaxpass import models

    d = 32
    params = {"w1": jax.random.normal(jax.random.key(0), (d, 48)) * 0.2,
              "w2": jax.random.normal(jax.random.key(1), (48, 16)) * 0.2}

    def fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    calib = [(jax.random.normal(jax.random.key(10 + i), (8, d)),) for i in range(3)]
    q = passes.Quantize(weights="int8", activations="int8", activation_scales="static")
    t = jaxpass.transform(fn, [q], params=params, example_args=calib[0], calibration_data=calib)
    xs = jnp.concatenate([c[0] for c in calib])
    step1 = float(jnp.max(jnp.abs(xs))) / 127
    step2 = float(jnp.max(jnp.abs(jnp.tanh(xs @ params["w1"])))) / 127
    np.testing.assert_allclose(float(t.params["w1"].act_scale.reshape(())), step1, rtol=1e-6)
    np.testing.assert_allclose(float(t.params["w2"].act_scale.reshape(())), step2, rtol=2e-2)
    # Reference: the same integer arithmetic written out by hand for the first matmul.
    x = jax.random.normal(jax.random.key(5), (8, d))
    t1 = jaxpass.transform(lambda p, x: x @ p["w1"], [q], params={"w1": params["w1"]},
                           example_args=calib[0], calibration_data=calib)
    w1 = t1.params["w1"]
    xq = jnp.clip(jnp.round(x / step1), -127, 127)
    h_ref = (xq @ w1.qvalue.astype(jnp.float32)) * step1 * w1.scale
    h = t1(x)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    rel = float(jnp.linalg.norm(t(x) - fn(params, x)) / jnp.linalg.norm(fn(params, x)))
    assert rel < 0.03
    # Stacked weights under scan: one step per layer; save/load keeps them.
    model = models.llama.with_scan_layers(models.random_model(models.configs.tiny()), True)
    ids = [(jax.random.randint(jax.random.key(i), (2, 16), 0, 97),) for i in range(2)]
    tm = jaxpass.transform(model, [q], example_args=ids[0], calibration_data=ids)
    assert tm.params["layers"]["mlp"]["down_proj"]["kernel"].act_scale.shape == (2, 1, 1)
    jaxpass.save(tm, str(tmp_path / "c"))
    from flax import nnx
    t2 = jaxpass.load(str(tmp_path / "c"), nnx.eval_shape(lambda: model))
    np.testing.assert_array_equal(t2(ids[0][0]), tm(ids[0][0]))


def test_static_activation_scales_need_activations_and_calibration():
    with pytest.raises(jaxpass.PassError, match="activation_scales='static'.*activations='int8'"):
        passes.Quantize(weights="int8", activation_scales="static")
    p = {"w": jnp.ones((8, 4))}
    with pytest.raises(jaxpass.PassError, match="needs calibration data"):
        jaxpass.transform(lambda p, x: x @ p["w"], [passes.Quantize(
            weights="int8", activations="int8", activation_scales="static")], params=p,
            example_args=(jnp.ones((2, 8)),))
