"""Dense-and-sparse quantization (Quantize(outliers=...)): exact outliers beside the codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import models, passes
from jaxpass.core.pass_api import PassError
from jaxpass.passes.quantize import QArray, quantize
from jaxpass.passes.quantize.qarray import expand

# Heavy-tailed weights (Student t, 3 degrees of freedom): a few large entries per channel, as in
# trained LLMs, which stretch round-to-nearest scales.
W = jax.random.t(jax.random.key(0), 3.0, (2, 64, 24))


def test_outliers_are_exact_and_the_rest_is_within_half_a_step_of_its_own_scale():
    q = quantize(W, (1,), fmt="int4", group_size=32, outliers=3)
    assert q.outlier_idx.shape == (2, 3, 24) and q.outlier_idx.dtype == jnp.int16
    dense = np.asarray(q.materialize())
    w = np.asarray(W)
    idx = np.asarray(q.outlier_idx, np.int64)
    # The outliers are the 3 largest |w| of each output channel, stored in float16.
    top = np.sort(np.argsort(-np.abs(w), axis=1)[:, :3], axis=1)
    np.testing.assert_array_equal(np.sort(idx, axis=1), top)
    np.testing.assert_array_equal(np.take_along_axis(dense, idx, 1),
                                  np.take_along_axis(w, idx, 1).astype(np.float16).astype(np.float32))
    mask = np.ones_like(w, bool)
    np.put_along_axis(mask, idx, False, 1)
    step = np.asarray(expand(q.scale, W.shape))
    assert np.all(np.abs(dense - w)[mask] <= step[mask] / 2 + 1e-6)
    # ... and the scales no longer cover the outliers: smaller steps than plain RTN's.
    plain = quantize(W, (1,), fmt="int4", group_size=32)
    assert float(jnp.mean(q.scale)) < 0.8 * float(jnp.mean(plain.scale))


def _layer_error(t, fn, params, x):
    ref = fn(params, x)
    return float(jnp.linalg.norm(t(x) - ref) / jnp.linalg.norm(ref))


def test_outliers_reduce_output_error_for_rtn_and_gptq_and_survive_jit_and_save(tmp_path):
    params = {"w1": jax.random.t(jax.random.key(1), 3.0, (64, 128)) * 0.1,
              "w2": jax.random.normal(jax.random.key(2), (128, 16)) * 0.1}

    def fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = jax.random.normal(jax.random.key(3), (64, 64))
    calib = [(jax.random.normal(jax.random.key(10 + i), (64, 64)),) for i in range(4)]
    errors = {}
    for method in ("rtn", "gptq"):
        for frac in (0.0, 0.02):
            q = passes.Quantize(weights="int4", group_size=32, outliers=frac, method=method)
            t = jaxpass.transform(fn, [q], params=params, example_args=(x,), calibration_data=calib)
            errors[method, frac] = _layer_error(t, fn, params, x)
            if frac:
                assert isinstance(t.params["w1"], QArray) and t.params["w1"].outlier_idx is not None
                np.testing.assert_array_equal(jax.jit(t.apply)(t.params, x), t(x))
                if method == "gptq":
                    jaxpass.save(t, str(tmp_path / "ckpt"))
                    t2 = jaxpass.load(str(tmp_path / "ckpt"), fn, params=jax.tree_util.tree_map(
                        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params))
                    np.testing.assert_array_equal(t2.params["w1"].outlier_val, t.params["w1"].outlier_val)
                    np.testing.assert_array_equal(t2(x), t(x))
    for method in ("rtn", "gptq"):
        assert errors[method, 0.02] < 0.85 * errors[method, 0.0], errors


def test_outliers_on_a_scanned_llama_and_lowering_says_why_it_stays_on_xla():
    model = models.llama.with_scan_layers(models.random_model(models.configs.tiny()), True)
    ids = jax.random.randint(jax.random.key(4), (2, 8), 0, 97)
    q = passes.Quantize(weights="int4", group_size=16, outliers=0.05)
    t = jaxpass.transform(model, [q], example_args=(ids,))
    t_plain = jaxpass.transform(model, [passes.Quantize(weights="int4", group_size=16)], example_args=(ids,))
    ref = model(ids)
    err = float(jnp.linalg.norm(t(ids) - ref) / jnp.linalg.norm(ref))
    err_plain = float(jnp.linalg.norm(t_plain(ids) - ref) / jnp.linalg.norm(ref))
    assert err < err_plain, (err, err_plain)
    stacked = t.params["layers"]["mlp"]["up_proj"]["kernel"]
    assert stacked.outlier_idx.shape[0] == 2  # one set per layer, sliced by the scan
    with pytest.raises(PassError, match=r"dense-and-sparse outliers are not lowered"):
        jaxpass.transform(models.random_model(models.configs.tiny()),
                          [q, passes.LowerToPallas(backend="triton", interpret=True)], example_args=(ids,))


@pytest.mark.parametrize("kw,match", [
    (dict(outliers=0.6), "outliers=0.6"),
    (dict(outliers=0.01, weights="int8", activations="int8"), "weight-only"),
    (dict(outliers=0.01, method="awq"), "method='awq'"),
])
def test_bad_outlier_settings_are_refused(kw, match):
    with pytest.raises(PassError, match=match):
        passes.Quantize(**kw)
