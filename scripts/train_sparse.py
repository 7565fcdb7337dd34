"""Sparse fine-tuning of SmolLM2-135M (2:4 by default) after one-shot pruning: how much of the
one-shot perplexity loss a short run recovers.

Three perplexities on the same held-out text (the evaluation corpus's first windows, as in
``scripts/eval_sparsity.py``), from one run:

1. the dense model;
2. one-shot pruning: ``Sparsify(pattern, method)`` in inference mode;
3. sparse training: ``transform(model, [Sparsify(...)], mode="train")`` (masked weights starting
   from the same one-shot mask), ``--steps`` optax AdamW steps through
   ``passes.sparsify.sparse_optimizer`` (SR-STE for N:M: straight-through gradients, decay of
   pruned weights, mask recomputed every step; masked gradients for unstructured) on text that
   never overlaps the held-out windows, then ``t.finalize(params)``: the inference model.

"Recovered" is (ppl2 - ppl3) / (ppl2 - ppl1). Stacked (scan-over-layers) weights are used.

    python scripts/train_sparse.py --steps 40 --out docs/sparse_train_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time


import jax
import jax.numpy as jnp

import jaxpass
from finetune_common import fine_tune, held_out_and_batches  # noqa: E402  (scripts/)
from jaxpass import evaluate, models, passes
from jaxpass.passes.sparsify import sparse_optimizer

EMBED = r"\['embed'\]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--method", default="wanda", help="one-shot start: magnitude, wanda or sparsegpt")
    ap.add_argument("--calib", type=int, default=8, help="calibration samples (wanda, sparsegpt)")
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--train-paragraph", type=int, default=100,
                    help="first KJV chapter of training text (the held-out windows end well before)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = models.smollm2(scan_layers=True)
    held_out, data = held_out_and_batches(tok, args)
    example = (jnp.asarray(data[0][:, :-1]),)
    sparsify = [passes.Sparsify(pattern=args.pattern, method=args.method, exclude=EMBED)]
    calib = None
    if args.method != "magnitude":   # from chapters after the training text, as eval_sparsity.py
        cids = tok.encode(evaluate.corpus.english_text(max_chars=args.calib_len * args.calib * 6,
                                                       start_paragraph=800))
        calib = [(jnp.asarray([cids[i * args.calib_len:(i + 1) * args.calib_len]], jnp.int32),)
                 for i in range(args.calib)]
        example = calib[0]

    def ppl(t):
        return evaluate.perplexity(t, held_out, context_length=args.context, max_windows=args.windows)

    rows, t0 = {}, time.time()
    rows["dense"] = ppl(model)
    rows["one-shot"] = ppl(jaxpass.transform(model, sparsify, example_args=example, check_numerics=False,
                                             calibration_data=calib))
    print({k: round(v, 4) for k, v in rows.items()}, flush=True)
    t = jaxpass.transform(model, sparsify, example_args=example, mode="train", check_numerics=False,
                          calibration_data=calib)
    params, losses = fine_tune(t, data, args.lr, "sparse fine-tune", wrap=sparse_optimizer)
    # Finalize with magnitude pruning at the same pattern: the trained weights are already sparse,
    # so it keeps exactly the trained mask (no calibration, no second reconstruction).
    final = t.finalize(params, passes=[passes.Sparsify(pattern=args.pattern, exclude=EMBED)])
    rows["sparse fine-tune -> finalize"] = ppl(final)
    zeros = [c.after for p in final.report for c in p.changed]

    gap = rows["one-shot"] - rows["dense"]
    recovered = (rows["one-shot"] - rows["sparse fine-tune -> finalize"]) / gap if gap > 0 else float("nan")
    meta = dict(command="python scripts/train_sparse.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        device=f"CPU ({platform.machine()}), jax {jax.__version__}", date=str(datetime.date.today()),
        sparsify=repr(sparsify[0]), train_tokens=args.steps * args.batch * args.seq,
        held_out_tokens=args.context * args.windows, seconds=round(time.time() - t0, 1))
    print(f"\n{meta}\n| model | perplexity |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} |")
    print(f"sparse fine-tuning recovers {100 * recovered:.1f}% of the one-shot perplexity gap")
    print("finalized params:", zeros[:3])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, ppl=rows, recovered=recovered, losses=losses,
                           finalized=zeros), f, indent=1)


if __name__ == "__main__":
    main()
