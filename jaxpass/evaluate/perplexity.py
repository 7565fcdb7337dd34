"""Perplexity over non-overlapping windows of a token stream."""

from __future__ import annotations

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
               batch_size: int = 1, max_windows: int | None = None) -> float:
    """``exp(mean NLL)`` of ``token_ids`` cut into non-overlapping windows of ``context_length``.

    Each window is scored independently (its first token is context only, so a window predicts
    ``context_length - 1`` tokens); a trailing remainder shorter than a window is dropped, so every
    call compiles one shape. ``model`` is anything callable as ``model(ids) -> logits``: an NNX
    module, a transformed model, or a plain function.
    """
    ids = np.asarray(token_ids, np.int32).ravel()
    n_windows = len(ids) // context_length
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least context_length={context_length} tokens, got {len(ids)}")
    windows = ids[: n_windows * context_length].reshape(n_windows, context_length)
    f = logits_fn(model)
    total = 0.0
    for start in range(0, n_windows, batch_size):
        batch = windows[start:start + batch_size]
        real = len(batch)
        if real < batch_size:  # pad the last batch to keep one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
        nll = np.asarray(_nll_sum(f(jnp.asarray(batch)), jnp.asarray(batch)))
        total += float(nll[:real].sum())
    return math.exp(total / (n_windows * (context_length - 1)))
