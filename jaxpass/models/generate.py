"""KV-cached autoregressive generation for plain and transformed models.

The model is used only through ``pure_method(model, "forward_cached")`` (see
:mod:`jaxpass.models.pure`) and its ``init_cache``, so a transformed model (``jaxpass.transform``)
generates the same way as the original. Prefill is one jitted call; the decode loop is a single
jitted ``jax.lax.while_loop`` (one compilation per prompt shape and sampling setting, no Python
per token or per layer).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.models.pure import pure_method


def _find_init_cache(model):
    """The ``init_cache`` of a model, or of the module a transformed model wraps."""
    for obj in (model, getattr(model, "model", None), getattr(model, "module", None),
                getattr(model, "original", None)):
        if obj is not None and hasattr(obj, "init_cache"):
            return obj.init_cache
    raise TypeError(f"{type(model).__name__} has no init_cache(batch, max_len, dtype=None): "
                    "generate needs a model with an explicit KV cache (jaxpass.models.Llama)")


def sample_token(logits, key, temperature: float, top_p: float):
    """One token id per row of float ``logits [b, vocab]``: argmax when ``temperature == 0``,
    else nucleus sampling (smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / jnp.float32(temperature)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep tokens whose preceding cumulative mass is below top_p (the first is always kept).
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_stop(tok, stop_tokens):
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    return jnp.any(tok[:, None] == stops[None, :], axis=-1)


@functools.lru_cache(maxsize=64)
def _compiled_prefill(fn, temperature: float, top_p: float):
    """Jitted prefill: the prompt through ``forward_cached`` and the first sampled token."""

    def prefill(params, state, ids, cache, key):
        (logits, cache), state = fn(params, state, ids, cache, jnp.int32(0))
        tok = sample_token(logits[:, -1], key, temperature, top_p)
        return tok, cache, state

    return jax.jit(prefill)


@functools.lru_cache(maxsize=64)
def _compiled_decode(fn, max_new_tokens: int, temperature: float, top_p: float,
                     stop_tokens: tuple[int, ...], pad_id: int):
    """Jitted decode loop: one ``lax.while_loop`` over single-token ``forward_cached`` steps."""

    def decode(params, state, first, cache, start, key):
        b = first.shape[0]
        out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
        done = _is_stop(first, stop_tokens)

        def cond(carry):
            i, _, _, _, done, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, out, cache, state, done, key = carry
            prev = jax.lax.dynamic_index_in_dim(out, i - 1, axis=1, keepdims=True)
            (logits, cache), state = fn(params, state, prev, cache, start + i - 1)
            key, sub = jax.random.split(key)
            tok = sample_token(logits[:, -1], sub, temperature, top_p)
            tok = jnp.where(done, pad_id, tok)
            out = jax.lax.dynamic_update_index_in_dim(out, tok, i, axis=1)
            return i + 1, out, cache, state, done | _is_stop(tok, stop_tokens), key

        carry = (jnp.int32(1), out, cache, state, done, key)
        _, out, _, state, _, _ = jax.lax.while_loop(cond, body, carry)
        return out, state

    return jax.jit(decode)


def _compiled(fn, max_new_tokens, temperature, top_p, stop_tokens, pad_id):
    """(prefill, decode) jitted functions for one pure forward and sampling setting."""
    return (_compiled_prefill(fn, temperature, top_p),
            _compiled_decode(fn, max_new_tokens, temperature, top_p, stop_tokens, pad_id))


def generate(model: Any, prompt_ids, max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), rng=None, *,
             cache_dtype=None, pad_id: int | None = None, init_cache=None) -> jax.Array:
    """Continues each row of ``prompt_ids`` (int ``[batch, prompt_len]``, equal lengths).

    Returns int32 ``[batch, prompt_len + max_new_tokens]``: the prompt then the new tokens. A row
    that emits one of ``stop_tokens`` is padded after it with ``pad_id`` (default: the first stop
    token, else 0); the loop ends early once every row has stopped.
    Greedy by default; ``temperature > 0`` samples (with nucleus ``top_p``) using ``rng``
    (a ``jax.random`` key; default key 0).

    The cache comes from ``init_cache(batch, max_len, dtype=cache_dtype)`` when given, else from
    the model's ``init_cache`` (for a transformed model: ``t.init_cache``, or that of the module
    it wraps, ``t.model``).
    """
    ids = jnp.asarray(prompt_ids, jnp.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be int [batch, prompt_len>0], got shape {ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    stop_tokens = tuple(int(s) for s in stop_tokens)
    if pad_id is None:
        pad_id = stop_tokens[0] if stop_tokens else 0
    b, p = ids.shape
    cache = (init_cache or _find_init_cache(model))(b, p + max_new_tokens, dtype=cache_dtype)
    fn, params, state = pure_method(model, "forward_cached")
    prefill, decode = _compiled(fn, int(max_new_tokens), float(temperature), float(top_p),
                                stop_tokens, int(pad_id))
    key = jax.random.key(0) if rng is None else rng
    key, k0 = jax.random.split(key)
    first, cache, state = prefill(params, state, ids, cache, k0)
    new, _ = decode(params, state, first, cache, jnp.int32(p), key)
    return jnp.concatenate([ids, new], axis=1)


def greedy_reference(model, prompt_ids, max_new_tokens: int) -> np.ndarray:
    """Greedy continuation by re-running the full (cache-free) forward for every token: for
    tests of :func:`generate` only. The sequence is kept at its final length (zeros after the
    current token, which causal attention never sees) so the forward compiles once."""
    fn, params, state = pure_method(model, "__call__")
    forward = jax.jit(fn)
    ids = np.asarray(prompt_ids, np.int32)
    b, p = ids.shape
    buf = np.zeros((b, p + max_new_tokens), np.int32)
    buf[:, :p] = ids
    for i in range(p, p + max_new_tokens):
        logits, _ = forward(params, state, jnp.asarray(buf))
        buf[:, i] = np.asarray(logits[:, i - 1]).argmax(-1)
    return buf


def time_generation(model: Any, prompt_ids, new_tokens: int, repeats: int = 2,
                    init_cache=None) -> dict:
    """Prefill and decode throughput of :func:`generate`'s own compiled pieces.

    Prefill: the jitted prompt pass; decode: the jitted ``while_loop`` over ``new_tokens``
    tokens per row (greedy, no stop tokens). Each is compiled and warmed up, then timed as the
    best of ``repeats`` runs. Tokens/s count all rows of the batch.
    """
    import time

    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time decoding, got {new_tokens}")
    ids = jnp.asarray(prompt_ids, jnp.int32)
    b, p = ids.shape
    cache = (init_cache or _find_init_cache(model))(b, p + new_tokens)
    fn, params, state = pure_method(model, "forward_cached")
    prefill, decode = _compiled(fn, int(new_tokens), 0.0, 1.0, (), 0)
    key = jax.random.key(0)

    def best(f):
        jax.block_until_ready(f())
        times = []
        for _ in range(max(repeats, 1)):
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            times.append(time.perf_counter() - t0)
        return min(times)

    t_prefill = best(lambda: prefill(params, state, ids, cache, key))
    first, filled, _ = prefill(params, state, ids, cache, key)
    t_decode = best(lambda: decode(params, state, first, filled, jnp.int32(p), key))
    return {"batch": b, "prompt": p, "steps": new_tokens,
            "prefill_tokens_per_s": b * p / t_prefill,
            "decode_tokens_per_s": b * (new_tokens - 1) / t_decode,
            "decode_ms_per_step": 1e3 * t_decode / (new_tokens - 1)}
