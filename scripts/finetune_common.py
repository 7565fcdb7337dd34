"""The short fine-tune shared by ``train_qat.py`` and ``train_sparse.py`` (one loop, two passes).

Both scripts fine-tune a train-mode ``jaxpass.transform`` of SmolLM2 on token windows of the
corpus with optax AdamW (warmup + cosine decay, global-norm clipping) and compare perplexities;
only the optimizer wrapper differs (``passes.sparsify.sparse_optimizer`` for sparse training).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
import optax
from rich.progress import track


def held_out_and_batches(tok, args):
    """The held-out windows (the corpus's start) and the training batches (from chapter
    ``args.train_paragraph`` on, never overlapping them), as both scripts use them."""
    from jaxpass import evaluate

    held_out = tok.encode(evaluate.corpus.english_text(max_chars=args.context * args.windows * 6))
    if len(held_out) < args.context * args.windows:
        raise SystemExit(f"corpus gave {len(held_out)} tokens, need {args.context * args.windows}")
    train_ids = np.asarray(tok.encode(evaluate.corpus.english_text(
        max_chars=args.batch * (args.seq + 1) * args.steps * 6, start_paragraph=args.train_paragraph)))
    return held_out, batches(train_ids, args.batch, args.seq, args.steps)


def batches(ids: np.ndarray, batch: int, seq: int, steps: int, seed: int = 0):
    """``steps`` batches of ``[batch, seq + 1]`` token windows drawn from ``ids``."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seq - 1, (steps, batch))
    return [np.stack([ids[s:s + seq + 1] for s in row]).astype(np.int32) for row in starts]


def fine_tune(t, data, lr: float, desc: str, wrap=None):
    """Next-token AdamW on ``t.params`` over ``data``; returns the trained params and losses.

    ``wrap``: an optional optimizer wrapper (e.g. ``sparse_optimizer``) around the optax chain.
    """
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, len(data) // 10), len(data))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.0))
    if wrap is not None:
        opt = wrap(opt)

    def loss_fn(params, ids):
        logits = t.apply(params, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(params, state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state, losses = t.params, opt.init(t.params), []
    for ids in track(data, description=desc):
        params, state, loss = step(params, state, jnp.asarray(ids))
        losses.append(float(loss))
    return params, losses
