"""Long-context retrieval tasks: pass-key retrieval and a RULER-style needle with distractors.

Both build prompts of exactly ``context_length`` tokens (the filler is cut at token level), so
every trial has one shape: one compilation, and trials batch together. Answers are generated
greedily with :func:`jaxpass.models.generate` (so a transformed model, e.g. with a compressed KV
cache, is evaluated through its own cache) and scored by exact match of the first number.

Pass-key prompt (Mohtashami & Jaggi 2023, "Landmark Attention", used by LongLoRA and others)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    them. I will quiz you about the important information there.
    <filler> The pass key is 71432. Remember it. 71432 is the pass key. <filler>
    What is the pass key? The pass key is

Needle prompt (RULER, Hsieh et al. 2024, "niah_multikey"): several "One of the special magic
numbers for <word> is: <7 digits>." sentences at random depths of real prose (the corpus of
:mod:`jaxpass.evaluate.corpus`); the question asks for one word's number, the others distract.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from jaxpass.evaluate import corpus

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize them. I will quiz you about the important information there.\n")
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                  "back again. ")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

NEEDLE_TASK = ("Some special magic numbers are hidden within the following text. Make sure to "
               "memorize them. I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {word} is: {value}. "
NEEDLE_QUESTION = ("\nWhat is the special magic number for {word} mentioned in the provided text? "
                   "The special magic number for {word} mentioned in the provided text is")
NEEDLE_WORDS = ("apple", "river", "lantern", "violin", "harbor", "meadow", "falcon", "granite",
                "orchid", "compass", "thunder", "velvet", "glacier", "pepper", "canyon", "saddle")


def _first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def _repeat_tokens(tok, text: str, n: int) -> list[int]:
    """At least ``n`` tokens of ``text`` repeated (encoded once, tiled)."""
    unit = tok.encode(text, add_bos=False)
    reps = -(-n // max(len(unit), 1))
    return (unit * reps)[:n]


def _build(tok, head: str, filler: list[int], inserts: Sequence[tuple[float, str]], tail: str,
           context_length: int) -> list[int]:
    """``head`` + filler with ``inserts`` (depth in [0,1], text) + ``tail``, exactly
    ``context_length`` tokens."""
    head_ids = tok.encode(head)
    tail_ids = tok.encode(tail, add_bos=False)
    ins_ids = [(d, tok.encode(s, add_bos=False)) for d, s in sorted(inserts)]
    budget = context_length - len(head_ids) - len(tail_ids) - sum(len(i) for _, i in ins_ids)
    if budget < 0:
        raise ValueError(f"context_length={context_length} is too short for the task's "
                         f"{context_length - budget} fixed tokens")
    if len(filler) < budget:
        raise ValueError(f"filler has {len(filler)} tokens, need {budget}")
    out, pos = list(head_ids), 0
    for depth, ids in ins_ids:
        cut = int(round(depth * budget))
        out += filler[pos:cut] + ids
        pos = cut
    out += filler[pos:budget] + tail_ids
    assert len(out) == context_length, (len(out), context_length)
    return out


def _answers(model, tok, prompts: np.ndarray, max_new_tokens: int, batch_size: int,
             init_cache=None) -> list[str]:
    from jaxpass.models.generate import generate

    texts = []
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s:s + batch_size]
        if len(batch) < batch_size:  # keep one compiled shape
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), 0)])
        out = np.asarray(generate(model, batch, max_new_tokens=max_new_tokens,
                                  init_cache=init_cache))[:len(prompts) - s]
        texts += [tok.decode(row[prompts.shape[1]:]) for row in out]
    return texts


def passkey_results(model: Any, tok, context_length: int = 4096,
                    depths: Sequence[float] = (0.1, 0.5, 0.9), trials: int = 5, seed: int = 0,
                    batch_size: int = 1, max_new_tokens: int = 8, init_cache=None) -> dict:
    """Per-depth pass-key accuracy: ``{"accuracy": float, "by_depth": {depth: acc},
    "samples": [(depth, key, answer_text), ...]}``. ``init_cache`` is passed to
    :func:`jaxpass.models.generate` (for models that do not carry their own)."""
    rng = np.random.default_rng(seed)
    filler = _repeat_tokens(tok, PASSKEY_FILLER, context_length)
    prompts, keys, ds = [], [], []
    for depth in depths:
        for _ in range(trials):
            key = str(int(rng.integers(10000, 100000)))
            prompts.append(_build(tok, PASSKEY_TASK, filler,
                                  [(depth, PASSKEY_NEEDLE.format(key=key))], PASSKEY_QUESTION,
                                  context_length))
            keys.append(key)
            ds.append(depth)
    texts = _answers(model, tok, np.asarray(prompts, np.int32), max_new_tokens, batch_size,
                     init_cache)
    hits = [_first_number(t) == k for t, k in zip(texts, keys)]
    by_depth = {d: float(np.mean([h for h, dd in zip(hits, ds) if dd == d])) for d in depths}
    return {"accuracy": float(np.mean(hits)), "by_depth": by_depth,
            "samples": list(zip(ds, keys, texts))}


def passkey(model: Any, tok, context_length: int = 4096, depths: Sequence[float] = (0.1, 0.5, 0.9),
            trials: int = 5, seed: int = 0, batch_size: int = 1, init_cache=None) -> float:
    """Exact-match accuracy of pass-key retrieval over ``depths`` x ``trials`` prompts of
    ``context_length`` tokens (5-digit keys, greedy answers)."""
    return passkey_results(model, tok, context_length, depths, trials, seed, batch_size,
                           init_cache=init_cache)["accuracy"]


def needle_results(model: Any, tok, context_length: int = 4096, num_needles: int = 4,
                   trials: int = 5, seed: int = 0, batch_size: int = 1,
                   max_new_tokens: int = 10, init_cache=None) -> dict:
    """RULER-style multi-key needle retrieval: ``num_needles`` key/value sentences (one asked,
    the rest distractors) at random depths of real prose. Returns accuracy and samples."""
    if not 1 <= num_needles <= len(NEEDLE_WORDS):
        raise ValueError(f"num_needles must be in [1, {len(NEEDLE_WORDS)}], got {num_needles}")
    rng = np.random.default_rng(seed)
    paras = corpus.paragraphs()
    prompts, answers = [], []
    for _ in range(trials):
        start = int(rng.integers(0, len(paras) // 2))
        text = corpus.english_text(context_length * 8, start_paragraph=start)
        filler = tok.encode(text, add_bos=False)
        words = rng.choice(len(NEEDLE_WORDS), num_needles, replace=False)
        values = [str(int(rng.integers(1_000_000, 10_000_000))) for _ in words]
        inserts = [(float(rng.uniform(0.05, 0.95)),
                    NEEDLE.format(word=NEEDLE_WORDS[w], value=v)) for w, v in zip(words, values)]
        ask = int(rng.integers(num_needles))
        prompts.append(_build(tok, NEEDLE_TASK, filler, inserts,
                              NEEDLE_QUESTION.format(word=NEEDLE_WORDS[words[ask]]),
                              context_length))
        answers.append(values[ask])
    texts = _answers(model, tok, np.asarray(prompts, np.int32), max_new_tokens, batch_size,
                     init_cache)
    hits = [_first_number(t) == a for t, a in zip(texts, answers)]
    return {"accuracy": float(np.mean(hits)), "samples": list(zip(answers, texts))}


def needle(model: Any, tok, context_length: int = 4096, num_needles: int = 4, trials: int = 5,
           seed: int = 0, batch_size: int = 1, init_cache=None) -> float:
    """Exact-match accuracy of the RULER-style needle task (see :func:`needle_results`)."""
    return needle_results(model, tok, context_length, num_needles, trials, seed,
                          batch_size, init_cache=init_cache)["accuracy"]
