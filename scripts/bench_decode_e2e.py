"""End to end: KV-cached greedy decoding, bf16 vs W8 vs W4, with and without LowerToPallas.

    python scripts/bench_decode_e2e.py --models smollm2,8b --batches 1,16 --out /tmp/e2e.json

For each model (random weights of the named shape, bf16 weights, activations and cache; the
layers unrolled so that every projection is its own matmul LowerToPallas can rewrite) and each
recipe of :data:`RECIPES`, the model is transformed (``jaxpass.transform``: ``Quantize`` then,
for ``+lower``, ``LowerToPallas``) and timed with
:func:`jaxpass.models.generate.time_generation`: the jitted prefill and ``while_loop`` that
``generate`` runs, best of ``--repeats`` after a warm-up; decode tokens/s count all rows. The
kernels each matmul got are read from ``t.report`` (LowerToPallas' rewrite entries). The LM head
is quantized like every other projection; the embedding stays bf16 (a gather, not a matmul).
Rows are written to ``--out`` after each one, so a cut-short run keeps what it measured.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpass
from jaxpass import models, passes
from jaxpass.models.generate import time_generation

EMBED = r"\['embed'\]"
RECIPES = {
    "bf16": [],
    "w8": [passes.Quantize(weights="int8", exclude=EMBED)],
    "w8+lower": [passes.Quantize(weights="int8", exclude=EMBED), passes.LowerToPallas()],
    "w4": [passes.Quantize(weights="int4", group_size=128, exclude=EMBED)],
    "w4+lower": [passes.Quantize(weights="int4", group_size=128, exclude=EMBED),
                 passes.LowerToPallas()],
    # structured pruning: 25% of each MLP's channels / of each layer's KV-head groups removed
    "ch25": [passes.Sparsify(pattern="channels", sparsity=0.25, exclude=EMBED)],
    "heads25": [passes.Sparsify(pattern="heads", sparsity=0.25, exclude=EMBED)],
}


def build(name: str):
    cfgs = {"8b": models.configs.llama3_8b, "1b": models.configs.llama32_1b,
            "smollm2": models.configs.smollm2_135m, "tiny": models.configs.tiny}
    return models.random_model(cfgs[name](dtype="bfloat16", param_dtype="bfloat16",
                                          scan_layers=False))


def kernels_chosen(t) -> dict:
    """Backend counts from LowerToPallas' report (e.g. {"triton_gemv": 224, "xla": 2})."""
    counts = collections.Counter()
    for rep in getattr(t, "report", []) or []:
        if getattr(rep, "name", "") != "LowerToPallas":
            continue
        for event in rep.events_of("rewrite"):
            if ": " in event.detail:  # "M=1 K=.. N=.. int4_g128_sym: triton_gemv (reason)"
                counts[event.detail.split(": ", 1)[1].split(" ", 1)[0]] += 1
    return dict(counts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,8b")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=0,
                    help="int4 group; 0: 128, or 64 / 16 where the model's widths need it")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = build(name)
        example = jnp.zeros((1, 16), jnp.int32)
        group = args.group_size or {"smollm2": 64, "tiny": 16}.get(name, 128)
        recipes = dict(RECIPES)
        for r in ("w4", "w4+lower"):  # SmolLM2's 576 = 4.5 x 128: its tables use groups of 64
            recipes[r] = [passes.Quantize(weights="int4", group_size=group, exclude=EMBED)] + \
                RECIPES[r][1:]
        base = None
        for recipe in args.recipes.split(","):
            t0 = time.time()
            m = (model if not recipes[recipe] else
                 jaxpass.transform(model, passes=recipes[recipe], example_args=(example,),
                                   check_numerics=False))
            build_s = time.time() - t0
            for b in (int(v) for v in args.batches.split(",")):
                ids = np.random.default_rng(b).integers(0, model.config.vocab_size, (b, args.prompt))
                row = {"model": name, "recipe": recipe, "int4_group": group, "batch": b, "prompt": args.prompt,
                       "steps": args.steps, "device": jax.devices()[0].device_kind,
                       "jax": jax.__version__, "transform_s": round(build_s, 1),
                       "kernels": kernels_chosen(m) if recipe.endswith("+lower") else {}}
                try:
                    row.update(time_generation(m, ids, args.steps, repeats=args.repeats))
                except Exception as e:  # report, keep measuring the other rows
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                if recipe == "bf16":
                    base = base or {}
                    base[b] = row.get("decode_tokens_per_s")
                if base and base.get(b) and row.get("decode_tokens_per_s"):
                    row["decode_x_bf16"] = row["decode_tokens_per_s"] / base[b]
                row["date"] = datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC")
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
            del m
    print("| model | recipe | batch | decode tok/s | x bf16 | kernels |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['batch']} | "
              f"{r.get('decode_tokens_per_s', float('nan')):.1f} | "
              f"{r.get('decode_x_bf16', float('nan')):.2f} | {r['kernels'] or r.get('error', '')} |")


if __name__ == "__main__":
    main()
