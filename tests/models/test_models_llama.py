"""The Llama decoder: shapes, cached == uncached forward, variants, named ops in the jaxpr."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpass import models
from jaxpass.models import configs
from jaxpass.models.config import LlamaConfig, RopeScaling, inv_frequencies

VARIANTS = {
    "gqa": configs.tiny(),
    "mha_tied_llama3rope": configs.tiny(
        num_layers=1, num_kv_heads=4, tie_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=16)),
    "mqa_bias_linearrope_window": configs.tiny(
        num_layers=1, num_kv_heads=1, qkv_bias=True, rope_scaling=RopeScaling("linear", factor=2.0),
        sliding_window=3),
}


def _full(model, ids):
    graphdef, state = nnx.split(model)
    return _jit_full(graphdef, state, ids)


def _step(model, ids, cache, positions):
    graphdef, state = nnx.split(model)
    return _jit_step(graphdef, state, ids, cache, positions)


@functools.partial(jax.jit, static_argnums=0)
def _jit_full(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


@functools.partial(jax.jit, static_argnums=0)
def _jit_step(graphdef, state, ids, cache, positions):
    return nnx.merge(graphdef, state).forward_cached(ids, cache, positions)


def _ids(b, s, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, s)), jnp.int32)


def _with_random_biases(model):
    """Biases are zero at init; make them non-zero so the test exercises them."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "bias":
            var.set_value(jnp.asarray(np.random.default_rng(len(path)).normal(size=var.shape) * 0.5,
                                      var.dtype))
    return model


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_prefill_and_decode_match_full_forward(name):
    config = VARIANTS[name]
    model = _with_random_biases(models.random_model(config, seed=1))
    ids = _ids(2, 9, config.vocab_size)
    full = _full(model, ids)
    assert full.shape == (2, 9, config.vocab_size) and full.dtype == jnp.float32
    cache = model.init_cache(2, 12)
    step = _step
    got, cache = step(model, ids[:, :5], cache, jnp.int32(0))  # prefill
    outs = [got]
    for t in range(5, 9):  # decode one token at a time (one compilation)
        logits, cache = step(model, ids[:, t:t + 1], cache, jnp.int32(t))
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_matches():
    # same shapes as the gqa case above, so only the 4-token chunk step compiles anew
    config = configs.tiny()
    model = models.random_model(config)
    ids = _ids(2, 9, config.vocab_size)
    cache = model.init_cache(2, 12)
    a, cache = _step(model, ids[:, :5], cache, jnp.int32(0))
    b, _ = _step(model, ids[:, 5:], cache, jnp.full((2, 4), 5) + jnp.arange(4))
    np.testing.assert_allclose(np.concatenate([a, b], 1), _full(model, ids), rtol=1e-5, atol=1e-5)


def test_bf16_model_runs_and_returns_float32_logits():
    from jaxpass.models.weights import load_hf_weights, to_hf_tensors
    f32 = models.random_model(configs.tiny())
    model = load_hf_weights(configs.tiny(dtype="bfloat16", param_dtype="bfloat16"),
                            to_hf_tensors(f32))
    logits = _full(model, _ids(1, 4, 97))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, 97)
    cache = model.init_cache(1, 4)
    assert cache[0].k.dtype == jnp.bfloat16 and cache[0].k.shape == (1, 4, 2, 8)
    np.testing.assert_allclose(logits, _full(f32, _ids(1, 4, 97)), atol=0.05)


def test_params_layout_and_named_ops_in_jaxpr():
    config = configs.tiny(tie_embeddings=True)
    model = models.random_model(config)
    assert model.layers[0].attn.q_proj.kernel.shape == (32, 32)    # [in, out]
    assert model.layers[0].mlp.down_proj.kernel.shape == (64, 32)
    graphdef, state = nnx.split(model)
    ids = _ids(1, 3, 97)
    cache = model.init_cache(1, 5)

    def step(state, ids, cache):
        return nnx.merge(graphdef, state).forward_cached(ids, cache, jnp.int32(0))

    eqns = jax.make_jaxpr(step)(state, ids, cache).jaxpr.eqns
    names = [e.primitive.name for e in eqns]
    assert names.count("jaxpass.kv_cache_update") == config.num_layers
    assert names.count("jaxpass.cached_attention") == config.num_layers
    attn = [e for e in eqns if e.primitive.name == "jaxpass.cached_attention"]
    assert [e.params["layer"] for e in attn] == [0, 1]
    assert attn[0].params["scale"] == pytest.approx(8 ** -0.5)
    full = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids).jaxpr.eqns
    assert sum(e.primitive.name == "jaxpass.causal_attention" for e in full) == 2
    # every linear is x @ W with W contracting its axis 0
    dots = [e for e in full if e.primitive.name == "dot_general"]
    assert any(e.params["dimension_numbers"][0][1] == (0,) for e in dots)


def test_sliding_window_limits_attention():
    config = configs.tiny(sliding_window=2)
    model = models.random_model(config)
    a = _ids(1, 6, 97, seed=0)
    b = a.at[0, 0].set((a[0, 0] + 1) % 97)  # changes a token outside the last query's window
    la, lb = _full(model, a), _full(model, b)
    assert not np.allclose(la[0, 1], lb[0, 1])
    # with two layers the receptive field is 2 * (window - 1) + 1 = 3 tokens
    np.testing.assert_allclose(la[0, 5], lb[0, 5], rtol=1e-6, atol=1e-6)


def test_llama3_rope_scaling_frequencies():
    c = configs.tiny(head_dim=64, num_heads=4, hidden_size=256, rope_theta=500000.0,
                     rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    got = inv_frequencies(c)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wavelen = 2 * np.pi / base
    # high frequencies (short wavelengths) unchanged, low frequencies divided by the factor
    np.testing.assert_allclose(got[wavelen < 8192 / 4], base[wavelen < 8192 / 4], rtol=1e-6)
    np.testing.assert_allclose(got[wavelen > 8192], base[wavelen > 8192] / 32, rtol=1e-6)
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert np.all(got[mid] <= base[mid]) and np.all(got[mid] >= base[mid] / 32)


def test_config_errors_and_shapes():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(vocab_size=10, hidden_size=32, intermediate_size=8, num_layers=1,
                    num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="not supported"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0})
    assert configs.llama3_8b().num_params == pytest.approx(8.03e9, rel=0.01)
    assert configs.llama32_1b().num_params == pytest.approx(1.236e9, rel=0.01)
    assert configs.smollm2_135m().num_params == pytest.approx(134.5e6, rel=0.01)
    assert configs.smollm2_135m().kv_bytes_per_token() == 30 * 2 * 3 * 64 * 4


def test_abstract_model_allocates_nothing():
    model = models.abstract_model(configs.llama3_8b())
    assert isinstance(model.embed.get_value(), jax.ShapeDtypeStruct)
    assert model.layers[31].mlp.down_proj.kernel.shape == (14336, 4096)
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                         jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert out.shape == (1, 8, 128256)


def test_bad_ids_shape():
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        models.random_model(configs.tiny())(jnp.zeros((3,), jnp.int32))


def test_scan_over_layers_matches_unrolled():
    from jaxpass.models.llama import with_scan_layers
    model = models.random_model(configs.tiny(), seed=4)
    scanned = with_scan_layers(model)
    assert scanned.layers.attn.q_proj.kernel.shape == (2, 32, 32)   # [layer, in, out]
    ids = _ids(2, 9, 97)
    full = _full(model, ids)
    np.testing.assert_allclose(_full(scanned, ids), full, rtol=1e-5, atol=1e-5)
    cache = scanned.init_cache(2, 12)
    assert cache.k.shape == (2, 2, 12, 2, 8)
    a, cache = _step(scanned, ids[:, :5], cache, jnp.int32(0))
    b, cache = _step(scanned, ids[:, 5:], cache, jnp.int32(5))
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, rtol=1e-5, atol=1e-5)
    graphdef, state = nnx.split(scanned)
    eqns = jax.make_jaxpr(lambda s, x, c: nnx.merge(graphdef, s).forward_cached(x, c, 0))(
        state, ids, scanned.init_cache(2, 12)).jaxpr.eqns
    (scan,) = [e for e in eqns if e.primitive.name == "scan"]
    inner = [e.primitive.name for e in scan.params["jaxpr"].jaxpr.eqns]
    assert "jaxpass.kv_cache_update" in inner and "jaxpass.cached_attention" in inner
    assert [b.attn.layer for b in with_scan_layers(scanned, False).layers] == [0, 1]
