"""KV-cached generation against a cache-free greedy reference."""

import jax
import numpy as np
import pytest

from jaxpass import models
from jaxpass.models import configs
from jaxpass.models.generate import greedy_reference, sample_token


@pytest.fixture(scope="module")
def model():
    return models.random_model(configs.tiny(), seed=3)


def test_greedy_matches_full_forward_argmax_loop(model):
    prompt = np.random.default_rng(0).integers(0, 97, (3, 5)).astype(np.int32)
    out = np.asarray(models.generate(model, prompt, max_new_tokens=8))
    assert out.shape == (3, 13) and out.dtype == np.int32
    np.testing.assert_array_equal(out, greedy_reference(model, prompt, 8))


def test_stop_tokens_pad_the_rest(model):
    prompt = np.random.default_rng(0).integers(0, 97, (3, 5)).astype(np.int32)
    ref = greedy_reference(model, prompt, 8)
    stop = int(ref[0, 7])  # the third new token of row 0
    out = np.asarray(models.generate(model, prompt, max_new_tokens=8, stop_tokens=(stop,)))
    for row, r in zip(out, ref):
        new, want = row[5:], r[5:]
        hits = np.flatnonzero(want == stop)
        end = hits[0] + 1 if len(hits) else len(want)
        np.testing.assert_array_equal(new[:end], want[:end])
        assert np.all(new[end:] == stop)


def test_sampling_is_reproducible(model):
    prompt = np.ones((3, 5), np.int32)
    a = models.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(1))
    b = models.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(1))
    c = models.generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    draws = {int(sample_token(logits, jax.random.key(i), 1.0, 0.7)[0]) for i in range(64)}
    assert draws == {0, 1}


def test_generate_errors(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        models.generate(model, np.ones((1, 3), np.int32), max_new_tokens=0)
    with pytest.raises(TypeError, match="init_cache"):
        models.generate(lambda ids: ids, np.ones((1, 3), np.int32))


def test_generate_through_an_identity_transform(model):
    import jaxpass

    prompt = np.random.default_rng(0).integers(0, 97, (3, 5)).astype(np.int32)
    t = jaxpass.transform(model, passes=[], example_args=(prompt,))
    out = models.generate(t, prompt, max_new_tokens=8)  # the cache comes from t.model.init_cache
    np.testing.assert_array_equal(out, models.generate(model, prompt, max_new_tokens=8))


def test_generate_through_an_int8_transform_decodes_with_quantized_matmuls(model):
    import jaxpass

    prompt = np.random.default_rng(1).integers(0, 97, (2, 5)).astype(np.int32)
    t = jaxpass.transform(model, passes=[jaxpass.passes.Quantize(weights="int8")], example_args=(prompt,))
    out = models.generate(t, prompt, max_new_tokens=6)
    ref = models.generate(model, prompt, max_new_tokens=6)
    assert out.shape == ref.shape and (out[:, :5] == prompt).all()
    assert np.mean(out == ref) > 0.8  # int8 weights may flip a near-tie argmax, rarely
    cache = t.model.init_cache(2, 11)  # the decode step is rewritten too
    closed = jax.make_jaxpr(lambda p: t.method("forward_cached").apply(p, prompt, cache, np.arange(5)[None].repeat(2, 0)))(t.params)
    assert "jaxpass.quantized_dot_general" in str(closed)


def test_time_generation_reports_throughput(model):
    from jaxpass.models.generate import time_generation
    prompt = np.zeros((3, 5), np.int32)  # the shapes above: reuses their compilations
    r = time_generation(model, prompt, 8, repeats=1)
    assert r["batch"] == 3 and r["prompt"] == 5 and r["steps"] == 8
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="new_tokens"):
        time_generation(model, prompt, 1)
