"""Quantization-aware training: Quantize(mode="train") fake-quantizes with straight-through
gradients on float masters, trains with optax, and finalizes to the real quantized model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpass
from jaxpass import models, passes
from jaxpass.core.pass_api import PassError
from jaxpass.passes.quantize import QArray
from jaxpass.passes.quantize.qat import FakeQuantized, fake_quantize

IDS = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)


def _model(scan_layers):
    cfg = models.configs.tiny(dtype="bfloat16")
    return models.llama.with_scan_layers(models.random_model(cfg), scan_layers)


@pytest.mark.parametrize("fmt,group,sym", [("int4", 16, True), ("int4", 16, False), ("int8", None, True),
                                           ("nf4", 16, True)])
def test_fake_quantize_forward_is_the_quantized_weight_and_gradient_is_identity(fmt, group, sym):
    w = jax.random.normal(jax.random.key(0), (3, 32, 8))
    q = jaxpass.passes.quantize.quantize(w, (1,), fmt=fmt, group_size=group, symmetric=sym)
    fq = fake_quantize(w, (-2,), fmt=fmt, group_size=group, symmetric=sym)
    np.testing.assert_array_equal(fq, q.materialize())
    cot = jax.random.normal(jax.random.key(2), w.shape)
    g = jax.grad(lambda w: jnp.sum(fake_quantize(w, (-2,), fmt=fmt, group_size=group,
                                                 symmetric=sym) * cot))(w)
    np.testing.assert_array_equal(g, cot)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_train_mode_matches_inference_forward_and_finalizes_to_it(scan_layers):
    model = _model(scan_layers)
    q = passes.Quantize(weights="int4", group_size=16)
    t_train = jaxpass.transform(model, [q], example_args=(IDS,), mode="train")
    t_inf = jaxpass.transform(model, [q], example_args=(IDS,))
    fq = [x for x in jax.tree_util.tree_leaves(t_train.params, is_leaf=lambda x: isinstance(x, FakeQuantized))
          if isinstance(x, FakeQuantized)]
    assert len(fq) == 8 if scan_layers else 15  # 7 per layer (+ lm_head): q k v o gate up down
    assert all(x.weight.dtype == jnp.float32 for x in fq)  # float masters, not codes
    # Forward: the fake-quantized program computes exactly what the real int4 program computes
    # (same codes and scales from the float32 master, dequantized, then cast to bf16).
    y_train, y_inf = t_train(IDS), t_inf(IDS)
    np.testing.assert_array_equal(y_train, y_inf)
    # finalize() without training gives exactly the inference transform.
    t_fin = t_train.finalize()
    assert jax.tree_util.tree_structure(t_fin.params) == jax.tree_util.tree_structure(t_inf.params)
    for a, b in zip(jax.tree_util.tree_leaves(t_fin.params), jax.tree_util.tree_leaves(t_inf.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(t_fin(IDS), y_inf)


def test_qat_with_optax_lowers_the_quantized_loss_and_finalize_keeps_it():
    model = _model(True)
    ids = jax.random.randint(jax.random.key(3), (4, 16), 0, 97)
    q = passes.Quantize(weights="int4", group_size=16, exclude=r"lm_head")
    t = jaxpass.transform(model, [q], example_args=(ids,), mode="train")

    def loss(params):
        logits = t.apply(params, ids[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    opt = optax.adam(3e-3)
    params, state = t.params, opt.init(t.params)

    @jax.jit
    def step(params, state):
        l, g = jax.value_and_grad(loss)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, l

    l0 = float(loss(params))
    for _ in range(30):
        params, state, _ = step(params, state)
    l1 = float(loss(params))
    assert l1 < l0 - 0.5, (l0, l1)
    # The trained masters moved; the user's model and the first params did not.
    assert isinstance(params["lm_head"]["kernel"], jax.Array)
    t_fin = t.finalize(params)
    assert any(isinstance(x, QArray) for x in jax.tree_util.tree_leaves(
        t_fin.params, is_leaf=lambda x: isinstance(x, QArray)))
    logits = t_fin(ids[:, :-1])
    l_fin = float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)))
    assert abs(l_fin - l1) < 0.05 * l1, (l_fin, l1)   # real int4 keeps what QAT learned


def test_train_mode_refuses_calibrated_methods_and_finalize_needs_train_mode():
    model = _model(False)
    with pytest.raises(PassError, match="mode='train'"):
        jaxpass.transform(model, [passes.Quantize(weights="int4", group_size=16, method="gptq")],
                          example_args=(IDS,), mode="train", calibration_data=[(IDS,)])
    t = jaxpass.transform(model, [passes.Quantize(weights="int8")], example_args=(IDS,))
    with pytest.raises(ValueError, match="finalize"):
        t.finalize()


def test_qat_activations_fake_quantize_the_matmul_input():
    model = _model(False)
    q = passes.Quantize(weights="int8", activations="int8")
    t_train = jaxpass.transform(model, [q], example_args=(IDS,), mode="train")
    t_inf = jaxpass.transform(model, [q], example_args=(IDS,))
    y_train, y_inf = t_train(IDS), t_inf(IDS)
    # Same per-token int8 grid on both sides; the real path multiplies integers and scales the
    # output, the fake one multiplies dequantized values held in the model's bf16 (relative
    # rounding 2^-9 per input): a few bf16 ulps of the logits after two layers.
    np.testing.assert_allclose(y_train, y_inf, atol=0.02 * float(jnp.max(jnp.abs(y_inf))))
    g = jax.jit(jax.grad(lambda p: jnp.sum(t_train.apply(p, IDS))))(t_train.params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(g))
