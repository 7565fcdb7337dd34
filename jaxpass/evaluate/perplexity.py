"""Perplexity over non-overlapping windows of a token stream."""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.evaluate._runner import logits_fn


@jax.jit
def _nll_sum(logits, ids):
    """Summed next-token negative log-likelihood of ``ids [b, s]`` under ``logits [b, s, V]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = ids[:, 1:]
    return -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0].sum(axis=-1)


def perplexity(model: Any, token_ids: Sequence[int], context_length: int = 1024,
               batch_size: int = 1, max_windows: int | None = None,
               cache_chunk: int | None = None) -> float:
    """``exp(mean NLL)`` of ``token_ids`` cut into non-overlapping windows of ``context_length``.

    Each window is scored independently (its first token is context only, so a window predicts
    ``context_length - 1`` tokens); a trailing remainder shorter than a window is dropped, so every
    call compiles one shape. ``model`` is anything callable as ``model(ids) -> logits``: an NNX
    module, a transformed model, or a plain function.

    ``cache_chunk``: score through the KV cache instead of the cache-free forward: each window
    is fed as consecutive chunks of ``cache_chunk`` tokens to ``forward_cached`` (the first
    chunk a prefill into an empty ``init_cache(batch, context_length)``, each later chunk
    attending to what the cache kept), so KV-cache compression (``passes.CompressKV``:
    quantization, eviction after every chunk) is what is measured. ``cache_chunk=1`` is pure
    token-by-token decoding. Needs a model with ``init_cache`` and ``forward_cached``.
    """
    ids = np.asarray(token_ids, np.int32).ravel()
    n_windows = len(ids) // context_length
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least context_length={context_length} tokens, got {len(ids)}")
    windows = ids[: n_windows * context_length].reshape(n_windows, context_length)
    if cache_chunk is not None:
        if not isinstance(cache_chunk, int) or not 1 <= cache_chunk <= context_length:
            raise ValueError(f"cache_chunk must be an int in [1, context_length={context_length}],"
                             f" got {cache_chunk!r}")
        f = _cached_scorer(model, context_length, cache_chunk)
    else:
        logits = logits_fn(model)
        f = lambda batch: _nll_sum(logits(batch), batch)
    total = 0.0
    for start in range(0, n_windows, batch_size):
        batch = windows[start:start + batch_size]
        real = len(batch)
        if real < batch_size:  # pad the last batch to keep one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
        nll = np.asarray(f(jnp.asarray(batch)))
        total += float(nll[:real].sum())
    return math.exp(total / (n_windows * (context_length - 1)))


@jax.jit
def _chunk_nll(logits, targets, valid):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0).sum(axis=-1)


@functools.lru_cache(maxsize=16)
def _jit_step(fn):
    return jax.jit(fn)


def _cached_scorer(model, context_length: int, chunk: int):
    """``f(ids [b, s]) -> summed NLL [b]`` through ``forward_cached`` in chunks."""
    from jaxpass.models.generate import _find_init_cache
    from jaxpass.models.pure import pure_method

    init_cache = _find_init_cache(model)
    fn, params, state = pure_method(model, "forward_cached")
    step = _jit_step(fn)

    def score(ids):
        b, s = ids.shape
        cache = init_cache(b, context_length)
        st = state
        total = jnp.zeros((b,), jnp.float32)
        for start in range(0, s, chunk):
            piece = ids[:, start:start + chunk]
            (logits, cache), st = step(params, st, piece, cache, jnp.int32(start))
            n = piece.shape[1]
            tgt = ids[:, start + 1:start + n + 1]
            valid = jnp.arange(n) < tgt.shape[1]
            tgt = jnp.pad(tgt, ((0, 0), (0, n - tgt.shape[1])))
            total = total + _chunk_nll(logits, tgt, valid[None, :])
        return total

    return score
