"""Sweeps the word-GEMV kernel's configs on the GPU against bf16 XLA and the byte kernel.

For each (shape, format, M) it checks the kernel against the f32 reference once, then times
every config in ``grid()`` on the device (``gpu_timing.device_time_us``: profiler trace, a distinct
weight copy per call), next to bf16 XLA and the byte kernel's tuned entry. It also times the best
config with the uint32 view of the weight computed in the wrapper (``as_words`` per call) to show
whether XLA's bitcast costs a copy. Results: $OUT/sweep_gemv.json; a summary table last.

    python3 scripts/sweep_gemv.py --shapes square_8k,lm_head --formats int4_g128_sym --ms 1
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_matmul import make_packed  # noqa: E402
from gpu_timing import copies_needed, copy_bandwidth, device_time_us  # noqa: E402
from gpu_kernel_check import import_kernels, rel_err  # noqa: E402


def grid(n, wide):
    """Configs swept: the best block shapes of a wider first sweep (the decode variants it once
    crossed them with were removed from the kernel: docs/bench_matmul.md)."""
    from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig
    shapes = [(32, 32, 8, 2), (64, 16, 8, 4), (128, 16, 8, 4), (64, 32, 8, 4), (64, 32, 4, 4),
              (32, 64, 4, 4), (64, 16, 4, 4), (128, 32, 4, 8)]
    if n >= 32768:
        shapes = [(64, 32, 1, 4), (32, 64, 1, 4), (64, 16, 2, 4), (64, 16, 4, 4), (128, 32, 1, 4),
                  (32, 64, 2, 4)]
    if wide:
        shapes += [(bn, bw, s, 4) for bn in (32, 64, 128) for bw in (16, 32, 64) for s in (2, 4, 8)]
    return [GemvConfig(bn, bw, s, w, 2) for bn, bw, s, w in shapes]


def main():
    import jax
    import jax.numpy as jnp
    import_kernels()
    from jaxpass.kernels_pallas.quantized_matmul import pallas_triton, reference, tuning
    from jaxpass.kernels_pallas.quantized_matmul import pallas_triton_gemv as gemv
    from jaxpass.kernels_pallas.quantized_matmul.arg_specs import LLAMA3_8B_KN
    from jaxpass.kernels_pallas.quantized_matmul.config import TritonConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="square_8k,lm_head,gate_up_proj,down_proj,q_o_proj")
    ap.add_argument("--formats", default="int4_g128_sym")
    ap.add_argument("--ms", default="1")
    ap.add_argument("--wide", action="store_true")
    ap.add_argument("--budget_s", type=float, default=500.0)
    args = ap.parse_args()
    t0 = time.time()
    out_dir = os.environ.get("OUT", "/tmp/sweep_out")
    os.makedirs(out_dir, exist_ok=True)
    dev = jax.devices()[0]
    bw = copy_bandwidth()
    print(f"{dev.device_kind} jax {jax.__version__} copy {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    key = jax.random.PRNGKey(0)
    keep = args.shapes.split(",")
    for name, k, n in [s for s in LLAMA3_8B_KN if s[0] in keep]:
        for fmt in args.formats.split(","):
            for m in (int(v) for v in args.ms.split(",")):
                if time.time() - t0 > args.budget_s:
                    print(f"budget reached: skip {name} {fmt} M{m}", flush=True)
                    continue
                probe = make_packed(key, k, n, fmt, 1)[0][0]
                copies = copies_needed(probe.nbytes)
                pws = make_packed(key, k, n, fmt, copies)
                pw = pws[0][0]
                xs = [jax.random.normal(jax.random.fold_in(key, 7 + i), (m, k), jnp.bfloat16)
                      for i in range(4)]
                c16 = copies_needed(k * n * 2)
                w16 = [(jax.random.normal(jax.random.fold_in(key, 50 + c), (k, n), jnp.float32)
                        / k ** 0.5).astype(jnp.bfloat16) for c in range(c16)]
                row = dict(shape=name, k=k, n=n, m=m, fmt=fmt, copies=copies)
                row["bf16_us"] = device_time_us(lambda x, w: x @ w,
                                                [(xs[i % 4], w16[i]) for i in range(c16)])
                del w16
                plain = [(xs[i % 4], pws[i][0]) for i in range(copies)]
                entry = tuning.lookup(fmt, jnp.bfloat16, m, k, n)
                if entry and entry.get("config"):
                    cfg = TritonConfig.from_dict(entry["config"])
                    row["byte_kernel"] = cfg.short()
                    row["byte_kernel_us"] = device_time_us(
                        functools.partial(pallas_triton.quantized_matmul_triton, config=cfg), plain)
                row["xla_fallback_us"] = device_time_us(reference.quantized_matmul_xla, plain)
                ref = reference.quantized_matmul_reference(xs[0], pw)
                words = [(xs[i % 4], pws[i][0], gemv.as_words(pws[i][0])) for i in range(copies)]
                jax.block_until_ready(words)
                sweep, best = [], None
                for cfg in grid(n, args.wide):
                    if gemv.check_config(xs[0].shape, xs[0].dtype, pw, cfg):
                        continue

                    def op(x, p, w_, cfg=cfg):
                        return gemv.quantized_matmul_gemv(x, p, config=cfg, words=w_)
                    try:
                        err = rel_err(op(*words[0]), ref)
                        t_us = device_time_us(op, words)
                    except Exception as ex:  # noqa: BLE001
                        print(f"  {cfg.short()} failed: {type(ex).__name__}: {str(ex)[:300]}",
                              flush=True)
                        continue
                    sweep.append((cfg.short(), round(t_us, 2), err))
                    if best is None or t_us < best[1]:
                        best = (cfg, t_us)
                row["sweep"] = sweep
                row["max_rel_err"] = max(e for _, _, e in sweep) if sweep else None
                if best:
                    cfg = best[0]
                    row["best"], row["best_us"] = cfg.short(), best[1]
                    row["best_bitcast_in_wrapper_us"], row["best_kernels"] = device_time_us(
                        functools.partial(gemv.quantized_matmul_gemv, config=cfg), plain,
                        breakdown=True)
                    nbytes = pw.nbytes + 2 * m * k + 2 * m * n
                    row["best_pct_bw"] = 100 * nbytes / (best[1] * 1e-6) / bw
                    row["best_x_bf16"] = row["bf16_us"] / best[1]
                rows.append(row)
                print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b)
                                  for a, b in row.items() if a != "sweep"}), flush=True)
                print("   sweep:", [s_[:2] for s_ in sorted(sweep, key=lambda s_: s_[1])[:10]],
                      flush=True)
                del pws, words, plain
                with open(os.path.join(out_dir, "sweep_gemv.json"), "w") as fh:
                    json.dump(dict(device=dev.device_kind, jax=jax.__version__,
                                   copy_bw_gbps=bw / 1e9, argv=sys.argv,
                                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                   rows=rows), fh, indent=1)
    print("| shape | fmt | M | bf16 us | byte kernel us | gemv best us | x bf16 | %bw | best | "
          "bitcast in wrapper us | max rel err |")
    for r_ in rows:
        print(f"| {r_['shape']} | {r_['fmt']} | {r_['m']} | {r_['bf16_us']:.1f} | "
              f"{r_.get('byte_kernel_us', float('nan')):.1f} | {r_.get('best_us', float('nan')):.1f} | "
              f"{r_.get('best_x_bf16', float('nan')):.2f} | {r_.get('best_pct_bw', float('nan')):.0f} | "
              f"{r_.get('best')} | {r_.get('best_bitcast_in_wrapper_us', float('nan')):.1f} | "
              f"{r_.get('max_rel_err') or float('nan'):.1e} |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
