"""Pruning accuracy on SmolLM2-135M-Instruct: perplexity of one-shot methods, one table.

Rows: the uncompressed fp32 model (the baseline of ``scripts/eval_quantization.py``, evaluated the
same way), then 50% unstructured and 2:4 sparsity for magnitude, Wanda and SparseGPT, then
SparseGPT 2:4 with int4 g64 / int8 per-channel weights, quantized jointly (in SparseGPT's sweep)
or afterwards (round to nearest), and structured rows (``pattern="channels"`` / ``"heads"``:
whole MLP channels or KV-head groups removed), with the token embedding (tied to the output head) left dense,
as the papers do. Text and calibration data
come from ``jaxpass.evaluate``'s corpus exactly as in ``eval_quantization.py`` (non-overlapping
evaluation windows; calibration from later chapters). Rows already in ``--out`` are not re-run.

    python scripts/eval_sparsity.py --context 1024 --windows 3 --out docs/sparsity_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

import jaxpass
from jaxpass import evaluate, models, passes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_quantization import EMBED  # noqa: E402  (the same exclusion as the quantization table)

RECIPES = {
    "fp32 (dense)": [],
    "magnitude 50%": [passes.Sparsify(sparsity=0.5, exclude=EMBED)],
    "magnitude 2:4": [passes.Sparsify(pattern="2:4", exclude=EMBED)],
    "Wanda 50%": [passes.Sparsify(sparsity=0.5, method="wanda", exclude=EMBED)],
    "Wanda 2:4": [passes.Sparsify(pattern="2:4", method="wanda", exclude=EMBED)],
    "SparseGPT 50%": [passes.Sparsify(sparsity=0.5, method="sparsegpt", exclude=EMBED)],
    "SparseGPT 2:4": [passes.Sparsify(pattern="2:4", method="sparsegpt", exclude=EMBED)],
    # Joint (SparseGPT's sweep also rounds the kept weights and compensates both errors) against
    # sequential (SparseGPT, then round-to-nearest Quantize of the pruned weights).
    "SparseGPT 2:4 + W4 g64 (joint)": [passes.Sparsify(pattern="2:4", method="sparsegpt", quantize="int4",
                                                       group_size=64, exclude=EMBED)],
    "SparseGPT 2:4 + W8 per-channel (joint)": [passes.Sparsify(pattern="2:4", method="sparsegpt",
                                                               quantize="int8", exclude=EMBED)],
    "SparseGPT 2:4 + W4 g64 (RTN after)": [passes.Sparsify(pattern="2:4", method="sparsegpt", exclude=EMBED),
                                           passes.Quantize(weights="int4", group_size=64, exclude=EMBED)],
    "SparseGPT 2:4 + W8 per-channel (RTN after)": [passes.Sparsify(pattern="2:4", method="sparsegpt",
                                                                   exclude=EMBED),
                                                   passes.Quantize(weights="int8", exclude=EMBED)],
    "SparseGPT 50% + W4 g64 (joint)": [passes.Sparsify(sparsity=0.5, method="sparsegpt", quantize="int4",
                                                       group_size=64, exclude=EMBED)],
    "SparseGPT 50% + W4 g64 (RTN after)": [passes.Sparsify(sparsity=0.5, method="sparsegpt", exclude=EMBED),
                                           passes.Quantize(weights="int4", group_size=64, exclude=EMBED)],
    # Structured: whole MLP channels removed (gate/up columns, down rows; the weights shrink).
    "channels 10% magnitude": [passes.Sparsify(pattern="channels", sparsity=0.1, exclude=EMBED)],
    "channels 25% magnitude": [passes.Sparsify(pattern="channels", sparsity=0.25, exclude=EMBED)],
    "channels 25% Wanda-sp": [passes.Sparsify(pattern="channels", sparsity=0.25, method="wanda",
                                              exclude=EMBED)],
    "channels 25% Wanda-sp + FLAP bias": [passes.Sparsify(pattern="channels", sparsity=0.25,
                                                          method="wanda", compensate=True,
                                                          exclude=EMBED)],
    "channels 10% Wanda-sp": [passes.Sparsify(pattern="channels", sparsity=0.1, method="wanda",
                                              exclude=EMBED)],
    "channels 10% Wanda-sp + FLAP bias": [passes.Sparsify(pattern="channels", sparsity=0.1,
                                                          method="wanda", compensate=True,
                                                          exclude=EMBED)],
    # Structured: whole KV-head groups (SmolLM2: 3 KV heads, each read by 3 of the 9 query heads)
    "heads 1/3 magnitude": [passes.Sparsify(pattern="heads", sparsity=1 / 3, exclude=EMBED)],
    "heads 1/3 Wanda-sp": [passes.Sparsify(pattern="heads", sparsity=1 / 3, method="wanda",
                                           exclude=EMBED)],
    "heads 1/3 FLAP": [passes.Sparsify(pattern="heads", sparsity=1 / 3, method="flap",
                                       exclude=EMBED)],
    "channels 10% FLAP": [passes.Sparsify(pattern="channels", sparsity=0.1, method="flap",
                                          exclude=EMBED)],
    "channels 25% FLAP": [passes.Sparsify(pattern="channels", sparsity=0.25, method="flap",
                                          exclude=EMBED)],
}


def calibration(tok, n: int, length: int, start_paragraph: int):
    ids = tok.encode(evaluate.corpus.english_text(max_chars=length * n * 6, start_paragraph=start_paragraph))
    return [(jnp.asarray([ids[i * length:(i + 1) * length]], jnp.int32),) for i in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--recipes", default="|".join(RECIPES), help="'|'-separated recipe names")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples (Wanda, SparseGPT)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-paragraph", type=int, default=800, help="first KJV chapter of calibration text")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    done = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            done = {r["recipe"]: r for r in json.load(f)["rows"]}
    model, tok = models.smollm2()
    ids = tok.encode(evaluate.corpus.english_text(max_chars=args.context * args.windows * 6))
    if len(ids) < args.context * args.windows:
        raise SystemExit(f"corpus gave {len(ids)} tokens, need {args.context * args.windows}")
    calib = calibration(tok, args.calib, args.calib_len, args.calib_paragraph)
    meta = dict(command="python scripts/eval_sparsity.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "recipes"),
        device=f"CPU ({platform.machine()}), jax {jax.__version__}", date=str(datetime.date.today()),
        tokens=args.context * args.windows, context=args.context)
    rows = dict(done)
    for name in args.recipes.split("|"):
        if name in rows:
            continue
        t0 = time.time()
        needs = any(getattr(p, "method", "rtn") not in ("rtn", "magnitude") for p in RECIPES[name])
        t = jaxpass.transform(model, RECIPES[name], example_args=(calib[0][0],), check_numerics=False,
                              calibration_data=calib if needs else None)
        ppl = evaluate.perplexity(t, ids, context_length=args.context, max_windows=args.windows)
        zeros = [c.after for p in t.report for c in p.changed if "zeros" in c.after]
        rows[name] = dict(recipe=name, passes=[repr(p) for p in RECIPES[name]], ppl=ppl,
                          param_bytes=t.report.params_bytes_after, pruned_params=len(zeros),
                          seconds=time.time() - t0, date=meta["date"], device=meta["device"])
        print(f"{name:<40} ppl {ppl:8.4f}  ({rows[name]['seconds']:.0f} s)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, rows=list(rows.values())), f, indent=1)
    base = rows.get("fp32 (dense)", {}).get("ppl")
    print(f"\n{meta}\n| recipe | perplexity | dPPL |\n|---|---|---|")
    for r in rows.values():
        d = f"{r['ppl'] - base:+.3f}" if base else "n/a"
        print(f"| {r['recipe']} | {r['ppl']:.4f} | {d} |")


if __name__ == "__main__":
    main()
