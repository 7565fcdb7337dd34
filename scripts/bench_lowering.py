"""End to end through the passes: one Llama-3-8B decoder block's matmuls, bf16 vs W8 vs W4.

The model is a function of a params pytree (random init, bf16): the seven projections of a
Llama-3-8B block (q, k, v, o, gate, up, down; 218M weights, 436 MB in bf16) applied to ``M`` tokens,
so the time is dominated by reading weights, as in decoding. Each variant is built with
``jaxpass.transform``: ``[]`` (bf16 XLA), ``[Quantize(int8)]`` and ``[Quantize(int4, g128)]``
(XLA: dequantize + dot), and the same followed by ``LowerToPallas()`` (the kernels, dispatched per
shape). Times are medians of jitted calls; bandwidth counts weight bytes read once per call.

    python scripts/bench_lowering.py --m 1,16 [--small]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import jax
import jax.numpy as jnp

import jaxpass
from jaxpass import passes

SHAPES = {"wq": (4096, 4096), "wk": (4096, 1024), "wv": (4096, 1024), "wo": (4096, 4096),
          "w_gate": (4096, 14336), "w_up": (4096, 14336), "w_down": (14336, 4096)}


def block(p, x):
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    h = x + (q + jnp.tile(k, 4) + jnp.tile(v, 4)) @ p["wo"]
    return h + (jax.nn.silu(h @ p["w_gate"]) * (h @ p["w_up"])) @ p["w_down"]


def _time(fn, *args, reps=50):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", default="1,16")
    ap.add_argument("--small", action="store_true", help="1/16 of the widths (CPU smoke test)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    div = 16 if args.small else 1
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    params = {n: (jax.random.normal(k, (a // div, b // div), jnp.float32) / (a // div) ** 0.5).astype(jnp.bfloat16)
              for k, (n, (a, b)) in zip(keys, SHAPES.items())}
    weight_bytes = {"bf16": 2.0, "W8": 1.0, "W4 g128": 0.5}
    variants = {
        "bf16": [],
        "W8": [passes.Quantize(weights="int8")],
        "W8 + LowerToPallas": [passes.Quantize(weights="int8"), passes.LowerToPallas()],
        "W4 g128": [passes.Quantize(weights="int4", group_size=128 // div)],
        "W4 g128 + LowerToPallas": [passes.Quantize(weights="int4", group_size=128 // div), passes.LowerToPallas()],
    }
    n_weights = sum(a * b for a, b in SHAPES.values()) / div ** 2
    rows = []
    for m in [int(s) for s in args.m.split(",")]:
        x = jax.random.normal(jax.random.key(1), (m, 4096 // div), jnp.bfloat16)
        base = None
        for name, plist in variants.items():
            t = jaxpass.transform(block, plist, params=params, example_args=(x,), check_numerics=False)
            f = jax.jit(t.apply)
            sec = _time(f, t.params, x, reps=args.reps)
            base = sec if base is None else base
            fmt = name.split(" +")[0]
            gbs = n_weights * weight_bytes[fmt] / sec / 1e9
            lowered = [e.detail for r in t.report for e in r.events_of("rewrite") if "quantized_dot_general ->" not in e.detail and "M=" in e.detail]
            rows.append(dict(m=m, variant=name, us=sec * 1e6, speedup_vs_bf16=base / sec, weight_GBps=gbs,
                             dispatch=sorted(set(d.split(": ", 1)[1] for d in lowered))))
            print(f"M={m:<4} {name:<26} {sec * 1e6:9.1f} us  {base / sec:5.2f}x bf16  {gbs:7.1f} GB/s  "
                  f"{rows[-1]['dispatch']}", flush=True)
    dev = jax.devices()[0]
    print(f"\ndevice: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, {datetime.date.today()}")
    print("| M | variant | time (us) | vs bf16 | weight GB/s | kernels chosen |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {r['variant']} | {r['us']:.1f} | {r['speedup_vs_bf16']:.2f}x | {r['weight_GBps']:.0f} | "
              f"{'; '.join(r['dispatch']) or '-'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
