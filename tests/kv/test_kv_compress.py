"""passes.CompressKV on a tiny Llama: cache contents, real memory savings, agreement with the
dense cache where the method is exact, and clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import evaluate, models, passes
from jaxpass.core.pass_api import PassError
from jaxpass.kernels_pallas.decode_attention import formats
from jaxpass.passes.compress_kv.values import KVSide

B, P, L = 2, 40, 64     # batch, prompt, cache length


@pytest.fixture(scope="module")
def model():
    cfg = models.configs.tiny(head_dim=32, dtype="float32", param_dtype="float32")
    return models.random_model(cfg, seed=1)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 97, (B, P + 3)), jnp.int32)


def _t(model, **kw):
    return jaxpass.transform(model, passes=[passes.CompressKV(**kw)],
                             example_args=(jnp.zeros((1, 8), jnp.int32),))


def _run(m, ids, cache):
    """Prefill ``P`` tokens then 3 decode steps; returns (logits list, cache)."""
    from jaxpass.models.pure import pure_method
    fn, params, state = pure_method(m, "forward_cached")
    f = jax.jit(fn)
    outs = []
    (lg, cache), _ = f(params, state, ids[:, :P], cache, jnp.int32(0))
    outs.append(lg[:, -1])
    for i in range(3):
        (lg, cache), _ = f(params, state, ids[:, P + i:P + i + 1], cache, jnp.int32(P + i))
        outs.append(lg[:, -1])
    return np.stack([np.asarray(o) for o in outs]), cache


@pytest.fixture(scope="module")
def dense_run(model, ids):
    return _run(model, ids, model.init_cache(B, L))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kw, bound, ratio", [
    (dict(method="int8"), 0.02, (32 + 4) / (32 * 4)),
    pytest.param(dict(method="kivi", bits=4, residual=32), 0.15, None, marks=pytest.mark.slow),
    pytest.param(dict(method="kivi", bits=2, residual=32), 0.5, None, marks=pytest.mark.slow),
    pytest.param(dict(method="fp8"), 0.1, (32 + 4) / (32 * 4), marks=pytest.mark.slow),
    pytest.param(dict(method="mustafar", sparsity=0.5), 0.5, None, marks=pytest.mark.slow),
])
def test_quantized_cache_matches_dense(model, ids, dense_run, kw, bound, ratio):
    t = _t(model, **kw)
    cache = t.init_cache(B, L)
    dense_bytes = evaluate.tree_bytes(model.init_cache(B, L))
    if ratio is not None:  # int8: 1 byte per element + one f32 scale per token and head
        assert evaluate.tree_bytes(cache) == pytest.approx(dense_bytes * ratio)
    assert evaluate.tree_bytes(cache) < dense_bytes
    logits, new_cache = _run(t, ids, cache)
    ref_logits, ref_cache = dense_run
    assert jax.tree_util.tree_structure(new_cache) == jax.tree_util.tree_structure(cache)
    assert _rel(logits, ref_logits) < bound
    # Cache contents: the stored keys are the dense ones within the format's error.
    side = new_cache[0].k
    assert isinstance(side, KVSide) and isinstance(side.state, formats._Base)
    n = P + 3
    k_deq = side.policy.dense_k(side.state, side.shape, jnp.float32,
                                lengths=jnp.full((B,), n, jnp.int32))[:, :n]
    k_ref = np.asarray(ref_cache[0].k[:, :n])
    if kw["method"] == "int8":  # symmetric absmax: at most half a step per element
        step = np.abs(k_ref).max(-1, keepdims=True) / 127
        assert np.all(np.abs(np.asarray(k_deq) - k_ref) <= step / 2 + 1e-6)
    else:
        assert _rel(np.asarray(k_deq), k_ref) < bound


@pytest.mark.slow
def test_int8_generation_and_perplexity_through_cache(model, ids):
    t = _t(model, method="int8")
    out = np.asarray(models.generate(t, ids[:, :P], max_new_tokens=4))
    ref = np.asarray(models.generate(model, ids[:, :P], max_new_tokens=4))
    assert out.shape == ref.shape and (out == ref).mean() > 0.95
    toks = np.asarray(ids).ravel()[:64]
    # The dense cache path is exact: same perplexity as the cache-free forward.
    assert evaluate.perplexity(model, toks, 32, cache_chunk=8) == pytest.approx(
        evaluate.perplexity(model, toks, 32), rel=1e-5)
    p8 = evaluate.perplexity(t, toks, 32, cache_chunk=8)
    assert p8 == pytest.approx(evaluate.perplexity(model, toks, 32), rel=2e-3)


def _kept_positions(side):
    pos = np.asarray(side.state.pos)
    return [sorted(int(x) for x in row if x >= 0) for row in pos.reshape(-1, pos.shape[-1])]


def test_streaming_keeps_sinks_and_recent_and_is_exact_with_full_budget(model, ids, dense_run):
    t = _t(model, method="streaming", budget=16, sinks=4)
    cache = t.init_cache(B, L)
    assert cache[0].k.state.k.shape == (B, 2, 16, 32)          # the buffer is 16 slots, not 64
    assert evaluate.tree_bytes(cache) < evaluate.tree_bytes(model.init_cache(B, L)) / 3
    _, new = _run(t, ids, cache)
    last = P + 2
    want = list(range(4)) + list(range(last - 11, last + 1))
    for layer in new:
        for kept in _kept_positions(layer.k):
            assert kept == want
    # Kept slots hold exactly the dense cache's rows (eviction never changes what it keeps).
    ref_cache = dense_run[1]
    st = new[0].k.state
    got = np.asarray(st.k)[0, 0]
    rows = np.asarray(ref_cache[0].k)[0, np.asarray(st.pos)[0, 0], 0]
    np.testing.assert_allclose(got, rows, rtol=1e-5, atol=1e-6)
    # With a budget as large as the cache nothing is evicted: logits equal the dense cache's.
    full = _t(model, method="streaming", budget=L)
    logits, _ = _run(full, ids, full.init_cache(B, L))
    np.testing.assert_allclose(logits, dense_run[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["h2o", "snapkv", "pyramidkv"])
def test_score_based_eviction(model, ids, dense_run, method):
    t = _t(model, method=method, budget=0.25, window=4)
    cache = t.init_cache(B, L)
    caps = [layer.k.state.pos.shape[-1] for layer in cache]
    if method == "pyramidkv":
        assert caps[0] > caps[1] and sum(caps) == pytest.approx(2 * 16, abs=1)
    else:
        assert caps == [16, 16]
    logits, new = _run(t, ids, cache)
    last = P + 2
    for layer, cap in zip(new, caps):
        for kept in _kept_positions(layer.k):
            assert len(kept) == cap
            assert set(range(last - 3, last + 1)) <= set(kept)          # the recent window
    assert np.all(np.isfinite(logits))
    assert _rel(logits, dense_run[0]) < 0.5


@pytest.mark.slow
def test_think_stores_fewer_key_channels(model, ids, dense_run):
    t = _t(model, method="think", channels=0.5)
    cache = t.init_cache(B, L)
    st = cache[0].k.state
    assert st.k.shape == (B, 2, L, 16) and st.v.shape == (B, 2, L, 32)
    logits, new = _run(t, ids, cache)
    ch = np.asarray(new[0].k.state.channels)
    assert ch.shape == (B, 2, 16) and np.all(np.diff(ch, axis=-1) > 0)
    # Keys stored are exactly the dense keys at the chosen channels.
    st = new[0].k.state
    pos = np.asarray(st.pos)[0, 0]
    assert sorted(pos[pos >= 0].tolist()) == list(range(P + 3))      # no token evicted
    ref_k = np.asarray(dense_run[1][0].k)[0, pos[pos >= 0], 0]     # batch 0, head 0
    got = np.asarray(st.k)[0, 0][pos >= 0]
    np.testing.assert_allclose(got, ref_k[:, ch[0, 0]], rtol=1e-5, atol=1e-6)
    assert _rel(logits, dense_run[0]) < 0.5


@pytest.mark.slow
def test_dense_cache_passes_through_unchanged(model, ids, dense_run):
    t = _t(model, method="int8")
    logits, _ = _run(t, ids, model.init_cache(B, L))
    np.testing.assert_allclose(logits, dense_run[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_peak_memory_of_a_decode_step_shrinks(model, ids):
    from jaxpass.models.pure import pure_method
    t = _t(model, method="int8")
    peaks = []
    for m, cache in ((model, model.init_cache(B, 512)), (t, t.init_cache(B, 512))):
        fn, params, state = pure_method(m, "forward_cached")
        peaks.append(evaluate.peak_bytes(lambda c: fn(params, state, ids[:, :1], c, jnp.int32(3)), cache)["peak"])
    assert peaks[1] < 0.6 * peaks[0]


@pytest.mark.parametrize("kw, match", [
    (dict(method="kivi", bits=3), "bits=2 or bits=4"),
    (dict(method="int8", bits=4), "bits"),
    (dict(method="snapkv"), "needs budget"),
    (dict(method="h2o", budget=0), "positive"),
    (dict(method="h2o", budget=1.5), r"\(0, 1\]"),
    (dict(method="int8", budget=8), "keeps every token"),
    (dict(method="lru"), "methods are"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(PassError, match=match):
        passes.CompressKV(**kw)


def test_budget_larger_than_cache(model):
    t = _t(model, method="h2o", budget=100)
    with pytest.raises(PassError, match="more than the cache length"):
        t.init_cache(1, 64)


def test_model_without_cache_ops():
    def fn(params, x):
        return x @ params["w"]
    with pytest.raises(PassError, match="no attention or cache operations"):
        jaxpass.transform(fn, passes=[passes.CompressKV()], params={"w": jnp.ones((4, 4))},
                          example_args=(jnp.ones((2, 4)),))


def test_inline_attention_is_named_in_the_error():
    def attn(params, x):
        q, k = x @ params["wq"], x @ params["wk"]
        return jax.nn.softmax(q @ k.T, axis=-1) @ x
    params = {"wq": jnp.ones((4, 4)), "wk": jnp.ones((4, 4))}
    with pytest.raises(PassError, match="softmax between matmuls"):
        jaxpass.transform(attn, passes=[passes.CompressKV()], params=params,
                          example_args=(jnp.ones((3, 4)),))


@pytest.mark.slow
def test_compressed_cache_needs_the_pass_that_made_it(model, ids):
    cache = _t(model, method="int8").init_cache(1, 16)
    plain = jaxpass.transform(model, passes=[], example_args=(jnp.zeros((1, 8), jnp.int32),))
    with pytest.raises(PassError, match="no pass of this transform takes such inputs"):
        plain.method("forward_cached")(ids[:1, :4], cache, 0)


def test_decode_eviction_replaces_the_slot_top_k_would_drop():
    """A decode step's in-place eviction (one row written) keeps exactly the slots, positions
    and scores that the general top-k over slots + new token keeps, ties included (empty slots
    at -inf, equal scores), and drops the new token itself when it ranks lowest."""
    from jaxpass.passes.compress_kv.policies import SlotState, keep_highest, replace_lowest

    rng = np.random.default_rng(0)
    b, kvh, cap, d = 3, 2, 6, 4
    k = jnp.asarray(rng.standard_normal((b, kvh, cap, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, kvh, cap, d)), jnp.float32)
    pos = jnp.asarray(rng.permutation(40)[:b * kvh * cap].reshape(b, kvh, cap), jnp.int32)
    pos = pos.at[0, 0, 4:].set(-1)                                   # two empty slots
    st = SlotState(k, v, pos, jnp.asarray(rng.random((b, kvh, cap)), jnp.float32))
    new = (jnp.asarray(rng.standard_normal((b, kvh, 1, d)), jnp.float32),
           jnp.asarray(rng.standard_normal((b, kvh, 1, d)), jnp.float32),
           jnp.full((b, kvh, 1), 50, jnp.int32))
    all_pos = jnp.concatenate([pos, new[2]], axis=-1)
    score = jnp.asarray(rng.random((b, kvh, cap + 1)), jnp.float32)
    score = score.at[1, 0, 2].set(score[1, 0, 5])                     # a tie
    pri = jnp.where(all_pos >= 0, score, -jnp.inf)
    pri = pri.at[1, 0, 2].set(pri[1, 0, 5]).at[2, 1, :].set(1.0)       # ties everywhere in one head
    pri = pri.at[2, 0, cap].set(-1.0)                                 # the new token ranks lowest
    a = keep_highest(st, new, all_pos, score, pri, None)
    r = replace_lowest(st, new, all_pos, score, pri, None)
    for i in range(b):
        for h in range(kvh):
            rows = lambda s: sorted(
                (int(p), float(sc), tuple(np.asarray(kk)), tuple(np.asarray(vv)))
                for p, sc, kk, vv in zip(s.pos[i, h], s.score[i, h], s.k[i, h], s.v[i, h]))
            assert rows(a) == rows(r), (i, h)
    assert 50 not in np.asarray(r.pos[2, 0]).tolist()


def test_bf16_model_generates_through_slot_attention():
    """A bf16 model's eviction cache decodes: slot attention with bf16 operands hit a dot that
    XLA's CPU runtime rejects (18 slots). The prefill attends to every prompt token, so the first
    new token is the uncompressed model's."""
    cfg = models.configs.tiny(dtype="bfloat16", param_dtype="bfloat16")
    model = models.random_model(cfg)
    t = jaxpass.transform(model, passes=[passes.CompressKV(method="snapkv", budget=0.25)],
                          example_args=(jnp.zeros((1, 16), jnp.int32),))
    ids = np.random.default_rng(0).integers(0, 97, (2, 64)).astype(np.int32)
    out = np.asarray(models.generate(t, ids, max_new_tokens=6))       # capacity 70: 18 slots
    assert out.shape == (2, 70)
    np.testing.assert_array_equal(out[:, :64], ids)
    assert ((out[:, 64:] >= 0) & (out[:, 64:] < 97)).all()
    np.testing.assert_array_equal(out[:, 64], np.asarray(models.generate(model, ids, 1))[:, 64])
