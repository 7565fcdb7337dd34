"""W8A8 and FP8 matmuls on the GPU against bf16, at prefill shapes (device time).

For each Llama-3-8B projection shape and M (default 1024 and 4096), in one run:

* ``bf16``: XLA ``x @ W``;
* ``xla_int8``: XLA int8 x int8 -> int32 (``preferred_element_type=int32``), then the per-token x
  per-channel scales, with x already quantized; ``xla_int8_dyn``: the same with x quantized in
  the graph (per-token absmax, round), as ``Quantize(activations="int8")`` runs it;
* ``jp_int8``: ``kernels_pallas.quantized_matmul.int8_matmul`` (the Pallas Triton kernel), best of
  a few block configs (listed in the JSON);
* ``xla_fp8``: XLA float8_e4m3fn x float8_e4m3fn with f32 accumulation, per-tensor scales.

Times are device times (``gpu_timing.device_time_us``); every op is checked against an f32
reference of the same quantized operands once (relative Frobenius error in the JSON).

    python3 scripts/bench_w8a8.py --out $OUT/bench_w8a8.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernel_check import import_kernels, rel_err  # noqa: E402
from gpu_timing import copies_needed, device_time_us  # noqa: E402


def main():
    import jax
    import jax.numpy as jnp
    qmm = import_kernels()
    from jaxpass.kernels_pallas.quantized_matmul.arg_specs import LLAMA3_8B_KN
    from jaxpass.kernels_pallas.quantized_matmul.config import Int8Config

    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1024,4096")
    ap.add_argument("--shapes", default="q_o_proj,gate_up_proj,down_proj,square_8k")
    ap.add_argument("--out", default="")
    ap.add_argument("--budget_s", type=float, default=400)
    args = ap.parse_args()
    t0 = time.time()
    key = jax.random.PRNGKey(0)
    configs = [Int8Config(128, 128, 64, 4, 3), Int8Config(128, 256, 64, 8, 3),
               Int8Config(128, 128, 128, 8, 3), Int8Config(64, 128, 128, 4, 4)]
    rows = []
    keep = args.shapes.split(",")
    for name, k, n in [s for s in LLAMA3_8B_KN if s[0] in keep]:
        c = copies_needed(k * n)
        wq = [jax.random.randint(jax.random.fold_in(key, i), (k, n), -127, 128).astype(jnp.int8)
              for i in range(c)]
        ws = jax.random.uniform(key, (1, n), jnp.float32, 0.5, 1.5) / 127
        w16 = [(w.astype(jnp.float32) * ws).astype(jnp.bfloat16) for w in wq]
        w8f = [(w.astype(jnp.float32) / 4).astype(jnp.float8_e4m3fn) for w in wq]
        for m in (int(v) for v in args.ms.split(",")):
            if time.time() - t0 > args.budget_s:
                print(f"budget reached: skip {name} M{m}", flush=True)
                continue
            x = jax.random.normal(jax.random.fold_in(key, 99), (m, k), jnp.bfloat16)
            xs = (jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / 127)
            xq = jnp.round(x.astype(jnp.float32) / xs).astype(jnp.int8)
            x8f = (x.astype(jnp.float32)).astype(jnp.float8_e4m3fn)

            def xla_int8(a, a_s, w):
                acc = jax.lax.dot_general(a, w, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.int32)
                return (acc.astype(jnp.float32) * a_s * ws).astype(jnp.bfloat16)

            def xla_int8_dyn(xb, w):
                s = jnp.max(jnp.abs(xb.astype(jnp.float32)), axis=1, keepdims=True) / 127
                a = jnp.round(xb.astype(jnp.float32) / s).astype(jnp.int8)
                return xla_int8(a, s, w)

            def xla_fp8(a, w):
                acc = jax.lax.dot_general(a, w, (((1,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
                return (acc * 4.0).astype(jnp.bfloat16)

            ref_int8 = (xq.astype(jnp.float32) @ wq[0].astype(jnp.float32)) * xs * ws
            ref_fp8 = (x8f.astype(jnp.float32) @ w8f[0].astype(jnp.float32)) * 4.0
            row = dict(shape=name, m=m, k=k, n=n, device=jax.devices()[0].device_kind,
                       jax=jax.__version__)
            row["bf16_us"] = device_time_us(lambda a, w: a @ w, [(x, w) for w in w16])
            row["xla_int8_us"] = device_time_us(xla_int8, [(xq, xs, w) for w in wq])
            row["xla_int8_err"] = rel_err(xla_int8(xq, xs, wq[0]), ref_int8)
            row["xla_int8_dyn_us"] = device_time_us(xla_int8_dyn, [(x, w) for w in wq])
            row["xla_fp8_us"] = device_time_us(xla_fp8, [(x8f, w) for w in w8f])
            row["xla_fp8_err"] = rel_err(xla_fp8(x8f, w8f[0]), ref_fp8)
            sweep = []
            for cfg in configs:
                f = functools.partial(qmm.int8_matmul, backend="triton", config=cfg)
                try:
                    err = rel_err(f(xq, xs, wq[0], ws), ref_int8)
                    t_us = device_time_us(f, [(xq, xs, w, ws) for w in wq])
                except Exception as e:  # noqa: BLE001
                    print(f"  {cfg.short()} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                sweep.append((cfg.short(), round(t_us, 2), err))
            row["jp_int8_sweep"] = sweep
            if sweep:
                best = min(sweep, key=lambda s: s[1])
                row["jp_int8"], row["jp_int8_us"], row["jp_int8_err"] = best
            for col in ("xla_int8_us", "xla_int8_dyn_us", "xla_fp8_us", "jp_int8_us"):
                if row.get(col):
                    row[col.replace("_us", "_x_bf16")] = row["bf16_us"] / row[col]
            rows.append(row)
            print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b)
                              for a, b in row.items() if a != "jp_int8_sweep"}), flush=True)
            if args.out:
                with open(args.out, "w") as fh:
                    json.dump(rows, fh, indent=1)
        del wq, w16, w8f
    print("| shape | M | bf16 us | xla int8 (x bf16) | xla int8 + dyn. quant | jaxpass int8 kernel | xla fp8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def cell(c):
            return f"{r[c + '_us']:.1f} ({r[c + '_x_bf16']:.2f}x)" if r.get(c + "_us") else "-"
        print(f"| {r['shape']} {r['k']}x{r['n']} | {r['m']} | {r['bf16_us']:.1f} | {cell('xla_int8')} | "
              f"{cell('xla_int8_dyn')} | {cell('jp_int8')} | {cell('xla_fp8')} |")


if __name__ == "__main__":
    main()
