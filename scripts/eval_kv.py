"""KV-cache compression accuracy on SmolLM2-135M-Instruct: perplexity through the cache path and
pass-key retrieval, each method next to the full (uncompressed) cache. One JSON row per
(method, task); rows already in the output file are skipped, so an interrupted run resumes.

Perplexity: ``evaluate.perplexity(m, ids, context_length=C, cache_chunk=K)``: each window goes
through ``forward_cached`` in chunks of K tokens, so quantization and eviction after every
chunk are what is measured. Pass-key: ``evaluate.passkey_results`` (the prompt is one prefill,
then greedy decoding through the compressed cache; budgets are fractions of prompt + 8 tokens).

    python scripts/eval_kv.py --task ppl --out docs/kv_cache_smollm2.json
    python scripts/eval_kv.py --task passkey --context 2048 --trials 2 --out docs/kv_cache_smollm2.json
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
from jaxpass.models.generate import _find_init_cache

C = passes.CompressKV
METHODS = {
    "full cache": None,
    "int8": C(method="int8"),
    "KIVI-4 (R=128)": C(method="kivi", bits=4, v_group_size=64),
    "KIVI-2 (R=128)": C(method="kivi", bits=2, v_group_size=64),
    "KIVI-2 (R=128, Gv=32)": C(method="kivi", bits=2, v_group_size=32),
    "KIVI-4 (R=128, Gv=32)": C(method="kivi", bits=4, v_group_size=32),
    # SmolLM2 variants (explicit options; the rows above are the paper's defaults).
    "KIVI-2 (R=128, Gv=32, 4 sinks)": C(method="kivi", bits=2, v_group_size=32,
                                        full_precision_sinks=4),
    "KIVI-2 (G=16, R=128, Gv=32, 4 sinks)": C(method="kivi", bits=2, group_size=16,
                                              v_group_size=32, full_precision_sinks=4),
    "KIVI-2 (G=16, R=128, Gv=16, 4 sinks)": C(method="kivi", bits=2, group_size=16,
                                              v_group_size=16, full_precision_sinks=4),
    "KIVI-2 (G=16, R=128, Gv=32)": C(method="kivi", bits=2, group_size=16, v_group_size=32),
    "KIVI-4 (R=128, 4 sinks)": C(method="kivi", bits=4, v_group_size=64,
                                 full_precision_sinks=4),
    "SnapKV 25%": C(method="snapkv", budget=0.25),
    "StreamingLLM 25%": C(method="streaming", budget=0.25),
    "H2O 25%": C(method="h2o", budget=0.25),
    "PyramidKV 25%": C(method="pyramidkv", budget=0.25),
    "fp8": C(method="fp8"),
    "Mustafar 50%": C(method="mustafar", sparsity=0.5),
    "ThinK 50% key channels": C(method="think", channels=0.5),
}
for frac in (0.5, 0.1):
    METHODS[f"StreamingLLM {frac:.0%}"] = C(method="streaming", budget=frac)
    METHODS[f"H2O {frac:.0%}"] = C(method="h2o", budget=frac)
    METHODS[f"SnapKV {frac:.0%}"] = C(method="snapkv", budget=frac)
    METHODS[f"PyramidKV {frac:.0%}"] = C(method="pyramidkv", budget=frac)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("ppl", "passkey"), default="ppl")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=256, help="cache_chunk for perplexity")
    ap.add_argument("--trials", type=int, default=2, help="pass-key trials per depth")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--methods", default="|".join(METHODS), help="'|'-separated method names")
    ap.add_argument("--out", default="docs/kv_cache_smollm2.json")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out")
    args = ap.parse_args()
    if args.table:
        print(table(args.out))
        return

    rows = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {(r["method"], r["task"], r["context"], r.get("windows", r.get("trials"))) for r in rows}
    model, tok = models.smollm2()
    ids = tok.encode(evaluate.english_text(args.context * args.windows * 8))
    example = jnp.zeros((1, 16), jnp.int32)
    depths = tuple(float(d) for d in args.depths.split(","))
    for name in args.methods.split("|"):
        if (name, args.task, args.context, args.windows if args.task == "ppl" else args.trials) in done:
            continue
        p = METHODS[name]
        m = model if p is None else jaxpass.transform(model, passes=[p], example_args=(example,))
        t0 = time.time()
        row = {"method": name, "task": args.task, "context": args.context,
               "pass": None if p is None else repr(p)}
        max_len = args.context if args.task == "ppl" else args.context + 8
        cache = jax.eval_shape(lambda: _find_init_cache(m)(1, max_len))
        row["kv_bytes_per_token"] = evaluate.tree_bytes(cache) / max_len
        if args.task == "ppl":
            row["perplexity"] = evaluate.perplexity(m, ids, args.context, max_windows=args.windows,
                                                    cache_chunk=args.chunk)
            row.update(windows=args.windows, chunk=args.chunk)
        else:
            res = evaluate.passkey_results(m, tok, args.context, depths=depths, trials=args.trials)
            row.update(accuracy=res["accuracy"], by_depth={str(k): v for k, v in res["by_depth"].items()},
                       trials=args.trials, answers=[s[2] for s in res["samples"]])
        row["seconds"] = round(time.time() - t0, 1)
        row["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
        with open(args.out, "w") as f:
            json.dump({"device": f"{platform.machine()} CPU, jax {jax.__version__}", "rows": rows}, f,
                      indent=1)


def table(path: str) -> str:
    """Markdown: one line per method, perplexity (1-window rows) and pass-key per context."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    ppl = {r["method"]: r for r in rows if r["task"] == "ppl" and r.get("windows") == 1}
    pk = {(r["method"], r["context"]): r for r in rows if r["task"] == "passkey"}
    ctxs = sorted({c for _, c in pk})
    base = ppl.get("full cache", {}).get("perplexity")
    head = ("| method | KV bytes/token (ppl row) | perplexity | dPPL | "
            + " | ".join(f"pass-key {c}" for c in ctxs) + " |")
    lines = [head, "|" + "---|" * (4 + len(ctxs))]
    for name in METHODS:
        r = ppl.get(name)
        if r is None and not any((name, c) in pk for c in ctxs):
            continue
        cells = [name]
        if r is not None:
            d = "" if base is None else f"{100 * (r['perplexity'] / base - 1):+.2f}%"
            cells += [f"{r['kv_bytes_per_token']:.0f}", f"{r['perplexity']:.4f}", d]
        else:
            cells += ["", "", ""]
        for c in ctxs:
            x = pk.get((name, c))
            cells.append("" if x is None else
                         f"{x['accuracy']:.2f} (" + " / ".join(f"{v:.0f}" for v in x["by_depth"].values())
                         + ")")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
