"""KIVI as the paper and its official code define it, pinned against an independent numpy
reference: keys quantized per channel over groups of ``group_size`` tokens, values per token over
groups of ``v_group_size`` channels, asymmetric min/max with round-to-nearest, only whole key
groups quantized, the newest tokens (at least ``residual - group_size + 1``, at most
``residual``) kept at full precision, the prompt's older tokens quantized in groups at prefill.
Plus ``full_precision_sinks``: the first tokens read at full precision, everything else unchanged.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import evaluate, models, passes
from jaxpass.core.pass_api import PassError
from jaxpass.passes.compress_kv.policies import SinkedState

B, KVH, D = 2, 2, 16
G, GV, R = 8, 8, 16


def _quant(x, axis, bits):
    """Asymmetric min/max round-to-nearest fake quantization (float32, as KIVI's code)."""
    mn, mx = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
    s = (mx - mn) / np.float32(2 ** bits - 1)
    safe = np.where(s > 0, s, 1).astype(np.float32)
    return np.clip(np.round((x - mn) / safe), 0, 2 ** bits - 1).astype(np.float32) * s + mn


def kivi_reference(k, v, n, bits):
    """What a KIVI cache holding the first ``n`` tokens of ``k, v [T, d]`` returns."""
    nq = G * -(-max(n - R, 0) // G)           # whole key groups, newest >= R - G + 1 kept
    ko, vo = k[:n].copy(), v[:n].copy()
    if nq:
        ko[:nq] = _quant(k[:nq].reshape(nq // G, G, D), 1, bits).reshape(nq, D)   # per channel
        vo[:nq] = _quant(v[:nq].reshape(nq, D // GV, GV), 2, bits).reshape(nq, D)  # per token
    return ko, vo, nq


def _policy(bits, sinks=0):
    return passes.CompressKV(method="kivi", bits=bits, group_size=G, v_group_size=GV,
                             residual=R, full_precision_sinks=sinks).policy()


def _kv(t, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(B, KVH, t, D)).astype(np.float32)
    k[..., 3] += 4.0                     # an outlier channel, as real keys have
    v = rng.normal(size=(B, KVH, t, D)).astype(np.float32)
    return k, v


@pytest.mark.parametrize("bits", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_kivi_matches_the_reference_through_prefill_and_decode(bits):
    import jax

    total = 52
    k, v = _kv(total)
    pol = _policy(bits)
    append, dequantize = jax.jit(pol.append), jax.jit(pol.dequantize)
    state = pol.init_state(B, 64, KVH, D, jnp.float32, 0, 1)
    # A 37-token prefill chunk, one 5-token chunk, then single-token decode steps (a key group
    # leaves the residual at length 49).
    steps = [(0, 37), (37, 42)] + [(i, i + 1) for i in range(42, total)]
    for a, b in steps:
        state = append(state, jnp.asarray(k[:, :, a:b]), jnp.asarray(v[:, :, a:b]),
                       jnp.full((B,), a, jnp.int32))
        kd, vd = (np.asarray(x) for x in dequantize(state, jnp.full((B,), b, jnp.int32)))
        for i in range(B):
            for h in range(KVH):
                kr, vr, nq = kivi_reference(k[i, h], v[i, h], b, bits)
                np.testing.assert_allclose(kd[i, h, :b], kr, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(vd[i, h, :b], vr, rtol=1e-5, atol=1e-5)
                # The newest tokens are exactly the originals (the full-precision residual).
                assert b - nq >= min(b, R - G + 1)
                np.testing.assert_array_equal(kd[i, h, nq:b], k[i, h, nq:b])


def test_full_precision_sinks_read_exact_and_change_nothing_else():
    import jax

    k, v = _kv(48, seed=1)
    plain, sinked = _policy(2), _policy(2, sinks=4)
    append = jax.jit(sinked.append)
    lengths = jnp.full((B,), 48, jnp.int32)
    s0 = plain.append(plain.init_state(B, 64, KVH, D, jnp.float32, 0, 1), jnp.asarray(k),
                      jnp.asarray(v), jnp.zeros((B,), jnp.int32))
    s1 = sinked.init_state(B, 64, KVH, D, jnp.float32, 0, 1)
    # Tokens 0-2 in one chunk, 3-47 in the next: the sink rows are filled across appends.
    for a, b in ((0, 3), (3, 48)):
        s1 = append(s1, jnp.asarray(k[:, :, a:b]), jnp.asarray(v[:, :, a:b]),
                    jnp.full((B,), a, jnp.int32))
    assert isinstance(s1, SinkedState) and s1.k.shape == (B, KVH, 4, D)
    k0, v0 = (np.asarray(x) for x in plain.dequantize(s0, lengths))
    k1, v1 = (np.asarray(x) for x in sinked.dequantize(s1, lengths))
    np.testing.assert_array_equal(k1[:, :, :4], k[:, :, :4])
    np.testing.assert_array_equal(v1[:, :, :4], v[:, :, :4])
    assert not np.allclose(k0[:, :, :4], k[:, :, :4])          # 2-bit really loses them
    np.testing.assert_array_equal(k1[:, :, 4:], k0[:, :, 4:])
    np.testing.assert_array_equal(v1[:, :, 4:], v0[:, :, 4:])
    # The cost is exactly the sink rows (k and v, model dtype).
    extra = evaluate.tree_bytes(s1) - evaluate.tree_bytes(s0)
    assert extra == 2 * B * KVH * 4 * D * 4


@pytest.mark.parametrize("kw, match", [
    (dict(method="kivi", bits=2, full_precision_sinks=-1), "int >= 0"),
    (dict(method="streaming", budget=8, full_precision_sinks=4), "quantizing methods"),
])
def test_full_precision_sinks_bad_arguments(kw, match):
    with pytest.raises(PassError, match=match):
        passes.CompressKV(**kw)


def _chunked_kivi_attention(bits, g, gv, r, chunk, sinks):
    """Causal attention as a KIVI cache fed in chunks of ``chunk`` tokens gives it: a query in
    the chunk starting at ``c`` reads positions below ``quantized_length(c)`` dequantized (first
    ``sinks`` exact) and every later one, its own chunk included, at full precision."""
    import jax

    def q(x, axis):
        mn, mx = x.min(axis, keepdims=True), x.max(axis, keepdims=True)
        s = (mx - mn) / (2 ** bits - 1)
        return jnp.clip(jnp.round((x - mn) / jnp.where(s > 0, s, 1)), 0, 2 ** bits - 1) * s + mn

    def attn(qs, k, v, *, scale, sliding_window=None):
        b, s, h, d = qs.shape
        kvh = k.shape[2]
        kq = q(k.reshape(b, s // g, g, kvh, d), 2).reshape(k.shape)
        vq = q(v.reshape(b, s, kvh, d // gv, gv), -1).reshape(v.shape)
        pos = jnp.arange(s)
        exact = (pos < sinks)[None, :, None, None]
        kq, vq = jnp.where(exact, k, kq), jnp.where(exact, v, vq)
        # Tokens in the cache when the query's chunk attends: a prefill chunk reads the cache as
        # it was before it; a decode step (chunk 1) appends first, then reads.
        seen = (pos // chunk) * chunk if chunk > 1 else pos + 1
        nq = g * ((jnp.maximum(seen - r, 0) + g - 1) // g)
        deq = pos[None, :] < nq[:, None]                                   # [query, key]
        qg = qs.reshape(b, s, kvh, h // kvh, d)
        sc = jnp.where(deq, jnp.einsum("bikgd,bjkd->bkgij", qg, kq),
                       jnp.einsum("bikgd,bjkd->bkgij", qg, k)) * scale
        p = jax.nn.softmax(jnp.where(pos[None, :] <= pos[:, None], sc, -jnp.inf), -1)
        o = (jnp.einsum("bkgij,bjkd->bikgd", jnp.where(deq, p, 0), vq)
             + jnp.einsum("bkgij,bjkd->bikgd", jnp.where(deq, 0, p), v))
        return o.reshape(b, s, h, d).astype(qs.dtype)

    return attn


@pytest.mark.parametrize("sinks, chunk, n", [
    (0, 16, 64), (4, 16, 64), pytest.param(4, 1, 40, marks=pytest.mark.slow)])
def test_cache_path_is_kivi_with_full_precision_chunks(monkeypatch, sinks, chunk, n):
    """What ``evaluate.perplexity(..., cache_chunk=)`` scores is exactly KIVI's semantics: each
    prefill chunk attends to the compressed history plus its own tokens at full precision, a
    decode step (chunk 1) to the cache after its own append, the residual and the
    ``full_precision_sinks`` exact (the logits equal a cache-free forward with that attention).
    With sinks, decode steps take the dequantizing path (the kernels' formats have no sink rows),
    and the report says so."""
    import jax

    import jaxpass.models.llama as llama
    from jaxpass.models.pure import pure_method

    cfg = models.configs.tiny(head_dim=32, dtype="float32", param_dtype="float32")
    model = models.random_model(cfg, seed=2)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 97, (2, n)), jnp.int32)
    t = jaxpass.transform(model, passes=[passes.CompressKV(
        method="kivi", bits=2, group_size=G, v_group_size=GV, residual=R,
        full_precision_sinks=sinks)], example_args=(jnp.zeros((1, 8), jnp.int32),))
    assert (sinks > 0) == any("full_precision_sinks" in x for x in t.report[0].notes)
    fn, params, state = pure_method(t, "forward_cached")
    step = jax.jit(fn)
    cache, got = t.init_cache(2, n), []
    for a in range(0, n, chunk):
        (lg, cache), state = step(params, state, ids[:, a:a + chunk], cache, jnp.int32(a))
        got.append(np.asarray(lg))
    got = np.concatenate(got, axis=1)
    dense = np.asarray(model(ids))
    monkeypatch.setattr(llama.attn_ops, "causal_attention",
                        _chunked_kivi_attention(2, G, GV, R, chunk, sinks))
    want = np.asarray(model(ids))
    err = np.abs(got - want).max()
    assert err < 1e-4
    assert np.abs(dense - want).max() > 100 * err        # the comparison can tell them apart


def test_think_reads_the_steps_own_keys_on_all_channels():
    """ThinK prunes the stored keys' channels, not the attention of the tokens being added: a
    prefill into an empty cache is exactly the dense model; a later chunk is not (it reads the
    pruned history), and the stored keys keep only the chosen channels."""
    import jax

    from jaxpass.models.pure import pure_method

    cfg = models.configs.tiny(head_dim=32, dtype="float32", param_dtype="float32")
    model = models.random_model(cfg, seed=4)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 48)), jnp.int32)
    t = jaxpass.transform(model, passes=[passes.CompressKV(method="think", channels=0.5)],
                          example_args=(jnp.zeros((1, 8), jnp.int32),))
    fn, params, state = pure_method(t, "forward_cached")
    step = jax.jit(fn)
    cache = t.init_cache(2, 64)
    (lg1, cache), state = step(params, state, ids[:, :32], cache, jnp.int32(0))
    (lg2, cache), state = step(params, state, ids[:, 32:], cache, jnp.int32(32))
    dense = np.asarray(model(ids))
    np.testing.assert_allclose(np.asarray(lg1), dense[:, :32], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(lg2) - dense[:, 32:]).max() > 1e-3
    assert cache[0].k.state.k.shape[-1] == cfg.head_dim // 2
