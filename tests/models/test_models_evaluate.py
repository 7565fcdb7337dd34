"""Perplexity, retrieval tasks and memory accounting on tiny models."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass import evaluate, models
from jaxpass.models import configs


def test_perplexity_of_uniform_model_is_vocab_size():
    vocab = 50
    uniform = lambda ids: jnp.zeros(ids.shape + (vocab,), jnp.float32)  # noqa: E731
    ids = np.arange(100) % vocab
    assert evaluate.perplexity(uniform, ids, context_length=10, batch_size=3) == pytest.approx(vocab)


def test_perplexity_matches_direct_computation():
    model = models.random_model(configs.tiny(), seed=0)
    ids = np.random.default_rng(1).integers(0, 97, 70)
    got = evaluate.perplexity(model, ids, context_length=16, batch_size=3)  # 4 windows, 1 padded
    from jaxpass.evaluate._runner import logits_fn
    f = logits_fn(model)  # the same compiled forward perplexity uses (batch 3)
    w = ids[:64].reshape(4, 16)
    logits = np.concatenate([np.asarray(f(jnp.asarray(w[:3]))),
                             np.asarray(f(jnp.asarray(w[[3, 3, 3]])))[:1]]).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], w[:, 1:, None], -1).mean()
    assert got == pytest.approx(np.exp(nll), rel=1e-5)
    with pytest.raises(ValueError, match="context_length=128"):
        evaluate.perplexity(model, ids, context_length=128)


def test_passkey_and_needle_prompts_have_exact_length(tiny_tokenizer):
    from jaxpass.evaluate import retrieval
    filler = retrieval._repeat_tokens(tiny_tokenizer, retrieval.PASSKEY_FILLER, 1024)
    for depth in (0.0, 0.5, 1.0):
        ids = retrieval._build(tiny_tokenizer, retrieval.PASSKEY_TASK, filler,
                               [(depth, retrieval.PASSKEY_NEEDLE.format(key="12345"))],
                               retrieval.PASSKEY_QUESTION, 1024)
        assert len(ids) == 1024
        assert "The pass key is 12345. Remember it." in tiny_tokenizer.decode(ids)
    with pytest.raises(ValueError, match="too short"):
        retrieval._build(tiny_tokenizer, retrieval.PASSKEY_TASK, filler, [], "", 10)


def test_passkey_and_needle_run_on_a_tiny_model(tiny_tokenizer):
    model = models.random_model(configs.tiny(vocab_size=300, max_position_embeddings=1024))
    # same prompt shape and answer length for both tasks: one prefill and one decode compilation
    r = evaluate.passkey_results(model, tiny_tokenizer, context_length=800, depths=(0.5,),
                                 trials=2, batch_size=2, max_new_tokens=8)
    assert 0.0 <= r["accuracy"] <= 1.0 and len(r["samples"]) == 2
    n = evaluate.needle_results(model, tiny_tokenizer, context_length=800, num_needles=3,
                                trials=2, batch_size=2, max_new_tokens=8)
    assert 0.0 <= n["accuracy"] <= 1.0 and len(n["samples"]) == 2


def test_memory_accounting():
    config = configs.tiny()
    model = models.random_model(config)
    cache = model.init_cache(2, 16)
    assert evaluate.tree_bytes(cache) == 2 * 2 * 2 * 16 * 2 * 8 * 4
    assert evaluate.kv_bytes_per_token(cache, 16) == 2 * 2 * 2 * 2 * 8 * 4
    assert evaluate.model_kv_bytes_per_token(model) == config.kv_bytes_per_token()
    assert evaluate.param_bytes(model) == config.num_params * 4


def test_corpus_is_prose():
    text = evaluate.english_text(5000)
    assert len(text) == 5000 and text.startswith("In the beginning God created")
    assert text.count(" the ") > 20


def test_peak_bytes_counts_arguments_outputs_and_temporaries():
    import jax.numpy as jnp

    a, b = jnp.ones((64, 128)), jnp.ones((128, 256))
    r = evaluate.peak_bytes(lambda a, b: jnp.sort(a @ b, axis=0)[:1], a, b)
    assert r["arguments"] == a.nbytes + b.nbytes and r["outputs"] == 256 * 4
    assert r["peak"] == r["arguments"] + r["outputs"] + r["temporaries"] - r["aliased"]
    assert r["temporaries"] >= 64 * 256 * 4  # the sorted product is materialized
