"""Attention in query chunks (``over_query_chunks``) equals attention over all queries at once:
the model's named ops and CompressKV's slot attention, ragged chunk counts, gradients, and the
end-to-end prefill of a model whose scores pass the chunking threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.models import attention
from jaxpass.passes.compress_kv import attend as slot_attend

B, T, H, KVH, D = 2, 37, 4, 2, 8


def _qkv(seed=0, t=T, s=T):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, t, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, s, KVH, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, s, KVH, D), jnp.float32)
    return q, k, v


def _tiny_budget(monkeypatch, rows):
    """Scores of ``rows`` query rows per chunk (so 37 queries take ceil(37 / rows) chunks)."""
    monkeypatch.setattr(attention, "MAX_SCORE_BYTES", 4 * B * H * T * rows)


@pytest.mark.parametrize("rows", [5, 8, 36])
def test_chunked_causal_attention_equals_one_call(monkeypatch, rows):
    q, k, v = _qkv()
    whole = attention._causal_attention(q, k, v, scale=D ** -0.5, sliding_window=6)
    _tiny_budget(monkeypatch, rows)
    chunked = jax.jit(lambda *a: attention._causal_attention(*a, scale=D ** -0.5,
                                                             sliding_window=6))(q, k, v)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_chunk_count_follows_the_byte_budget(monkeypatch):
    q, k, v = _qkv()
    _tiny_budget(monkeypatch, 5)
    jaxpr = jax.make_jaxpr(lambda *a: attention._causal_attention(*a, scale=1.0))(q, k, v)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(loops) == 1 and loops[0].params["length"] == 8            # ceil(37 / 5)
    monkeypatch.setattr(attention, "MAX_SCORE_BYTES", 4 * B * H * T * T)
    jaxpr = jax.make_jaxpr(lambda *a: attention._causal_attention(*a, scale=1.0))(q, k, v)
    assert not [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def test_chunked_attention_gradients_match(monkeypatch):
    q, k, v = _qkv(1)
    loss = lambda q, k, v: jnp.sum(attention._causal_attention(q, k, v, scale=0.3) ** 2)
    whole = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    _tiny_budget(monkeypatch, 7)
    chunked = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mass_rows", [None, 5, T])
def test_chunked_slot_attention_equals_one_call(monkeypatch, mass_rows):
    """CompressKV's attention over slots (arbitrary positions, an evicted ``-1`` slot, a segment
    of new tokens): the output and the per-slot probability mass of the last ``mass_rows`` query
    rows are unchanged by chunking (the chunks add their rows' mass; padded rows add none)."""
    rng = np.random.default_rng(0)
    q, k, v = _qkv(2, s=24)
    ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                 # [b, kvh, S, d]
    pos = jnp.asarray(rng.permutation(40)[:24].reshape(1, 1, 24).repeat(B, 0).repeat(KVH, 1),
                      jnp.int32).at[:, :, 3].set(-1)
    positions = jnp.broadcast_to(jnp.arange(40, 40 + T, dtype=jnp.int32), (B, T))
    _, k_new, v_new = _qkv(3)                                            # [b, T, kvh, d]
    new = slot_attend.new_tokens(ks, vs, k_new, v_new, positions)
    call = lambda: slot_attend.attend(q, ks, vs, pos, positions, scale=0.25, new=new,
                                      mass_rows=mass_rows)
    out, mass = call()
    _tiny_budget(monkeypatch, 6)
    out_c, mass_c = jax.jit(call)()
    np.testing.assert_allclose(out_c, out, rtol=1e-6, atol=1e-6)
    if mass_rows is None:
        assert mass is None and mass_c is None
        return
    np.testing.assert_allclose(mass_c, mass, rtol=1e-5, atol=1e-6)
    assert mass_c.shape == (B, KVH, 24 + T)
    # the mass is the probabilities of the last rows, summed: each query row's sum to 1 per head
    np.testing.assert_allclose(mass_c.sum(-1), (H // KVH) * min(mass_rows, T), rtol=1e-5)


def test_chunked_prefill_generates_the_same_tokens(monkeypatch):
    """A whole model: generation with every attention call chunked (a few query rows per chunk)
    gives the tokens and logits of the unchunked model, for the plain cache and for CompressKV."""
    import jaxpass
    from jaxpass import models, passes
    from jaxpass.models import configs

    model = models.random_model(configs.tiny(), seed=3)
    prompt = np.random.default_rng(0).integers(0, 97, (2, 29)).astype(np.int32)
    kv = jaxpass.transform(model, passes=[passes.CompressKV(method="h2o", budget=16)],
                           example_args=(jnp.zeros((1, 16), jnp.int32),))
    want = [np.asarray(models.generate(m, prompt, max_new_tokens=6)) for m in (model, kv)]
    logits = np.asarray(model(prompt))
    monkeypatch.setattr(attention, "MAX_SCORE_BYTES", 4 * 2 * 4 * 40 * 3)   # ~3 query rows
    # 7 new tokens: a new cache capacity, so generate traces (and chunks) afresh
    got = [np.asarray(models.generate(m, prompt, max_new_tokens=7)) for m in (model, kv)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[:, :35], w)
    assert "stablehlo.while" in jax.jit(model).lower(prompt).as_text()   # the forward chunks
    np.testing.assert_allclose(np.asarray(model(prompt)), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mass_rows", [None, 4])
def test_prefill_into_empty_slots_attends_to_the_new_tokens_only(mass_rows):
    """Every slot empty (a fresh prompt): ``attend`` takes the branch that skips the slots, with
    the result of attending over slots + new tokens; any filled slot takes the full branch."""
    q, k, v = _qkv(4, s=24)
    ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    _, k_new, v_new = _qkv(5)
    new = slot_attend.new_tokens(ks, vs, k_new, v_new, positions)
    for filled in (False, True):
        pos = jnp.full((B, KVH, 24), -1, jnp.int32)
        if filled:
            pos = pos.at[1, 0, 5].set(2)
        args = (q, ks, vs, pos, positions)
        got = jax.jit(lambda *a: slot_attend.attend(*a, scale=0.3, new=new,
                                                    mass_rows=mass_rows))(*args)
        want = slot_attend._attend_chunked(*args, 0.3, None, None, new, mass_rows)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
        if mass_rows is not None:
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
            assert float(jnp.abs(got[1][:, :, :24]).max()) == (0.0 if not filled else
                                                               float(jnp.abs(want[1][:, :, :24]).max()))
    jaxpr = jax.make_jaxpr(lambda *a: slot_attend.attend(*a, scale=0.3, new=new))(*args)
    assert "cond" in str(jaxpr)


def test_a_row_that_sees_no_slot_gets_zero_output_and_mass():
    """Queries before every stored position (or a cache with nothing left) attend to nothing:
    zero output and zero mass, not the uniform weights a softmax over all-masked scores gives."""
    q, k, v = _qkv(6, s=24)
    ks, vs = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    pos = jnp.broadcast_to(jnp.arange(100, 124, dtype=jnp.int32), (B, KVH, 24))
    positions = jnp.broadcast_to(jnp.arange(90, 90 + T, dtype=jnp.int32), (B, T))   # 90..126
    out, mass = slot_attend.attend(q, ks, vs, pos, positions, scale=0.3, mass_rows=T)
    blind = np.asarray(positions[0] < 100)
    assert blind.sum() == 10 and np.all(np.asarray(out)[:, blind] == 0)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.abs(np.asarray(out)[:, ~blind]).sum(-1) > 0)
    # the mass is what the seeing rows gave: each gives 1 per query head
    np.testing.assert_allclose(np.asarray(mass).sum(-1), (H // KVH) * (~blind).sum(), rtol=1e-5)
    # and a seeing row's output is the softmax average of the slots it sees
    r = 20                                                     # position 110 sees slots 100..110
    s = np.einsum("bhd,bksd->bhks", np.asarray(q[:, r]), np.asarray(ks)) * 0.3
    hk = np.arange(H) // (H // KVH)
    s = s[:, np.arange(H), hk][:, :, :11]
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhs,bhsd->bhd", p, np.asarray(vs)[:, hk, :11])
    np.testing.assert_allclose(np.asarray(out)[:, r], want, rtol=1e-5, atol=1e-5)
