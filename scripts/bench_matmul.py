"""Benchmarks the quantized matmul on the GPU against XLA, and autotunes the kernel configs.

For each Llama-3-8B projection shape (arg_specs.LLAMA3_8B_KN) and M, in one run:

* ``bf16``     XLA ``x @ W`` with a bf16 weight;
* ``xla_int8`` XLA with an int8 per-channel weight, convert + dot + scale in the graph;
* ``xla_int4`` XLA with a native ``jnp.int4`` weight, group 128, convert + scale + dot in the graph;
* ``jp_int4`` / ``jp_int8``: ``quantized_matmul(x, pw)`` (auto dispatch) for int4 g128 symmetric
  and int8 per-channel symmetric, with the backend/config it chose;

and the device-to-device copy bandwidth measured in the same run (bytes read + written), against
which the kernels' achieved GB/s (weight + scales + x + y bytes, each once) is given in percent.

Timing: device time from a profiler trace (``gpu_timing.device_time_us``: the median span of
one call's executable on the GPU over 40 calls, each call a separate launch), cycling through
enough distinct weight copies that no call finds its weight in the 50 MB L2. (Until 2026-11-23 the
script timed R and 2R calls in one executable on the host; with decode kernels of 5-50 us, host
launch costs leaked into that slope and scattered it 2-3x between configs.)

With ``--tune``, decode shapes (M <= 64) first sweep the kernel configs in ``candidates()`` (the
word GEMV and the byte kernel at M = 1) and the best (or XLA, if faster) goes to
this machine's tuning cache (``--table user``, the default; ``--table package`` updates the shipped
tuned_configs.json), which the auto dispatch then uses. Full results go to $OUT
(bench_results.json, and with ``--tune`` a copy of the table).

    python scripts/bench_matmul.py --tune            # on the GPU; table printed last
    python scripts/bench_matmul.py --quick           # two shapes, decode M only
    # as recorded in docs/bench_matmul.md (two calls, each under the device tool's 10 minutes):
    python scripts/bench_matmul.py --tune --shapes q_o_proj,gate_up_proj,down_proj --budget_s 430
    python scripts/bench_matmul.py --tune --shapes lm_head,square_8k --budget_s 300
    # SmolLM2's shapes (arg_specs.SMOLLM2_KN), int4 in groups of 64:
    python scripts/bench_matmul.py --tune --shapes smol_q_o,smol_kv,smol_gate_up,smol_down,smol_lm_head --ms 1,16 --formats int4_g64_sym,int8_pc_sym
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernel_check import import_kernels  # noqa: E402  (also sets up the package path)
from gpu_timing import copies_needed, copy_bandwidth, device_time_us  # noqa: E402



def time_per_op(fn, xs, ws):
    """Seconds per ``fn(x, *w)`` call on the device (``gpu_timing.device_time_us``).

    Calls cycle through ``xs`` and ``ws`` together; ``ws`` holds enough distinct weight copies
    that no call finds its weight in L2 (``gpu_timing.copies_needed``).
    """
    count = max(len(xs), len(ws))
    args = [(xs[i % len(xs)], *ws[i % len(ws)]) for i in range(count)]
    if jax_backend() != "gpu":  # --cpu_smoke: no device trace; one wall-clock call
        import jax
        f = jax.jit(fn)
        jax.block_until_ready(f(*args[0]))
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args[0]))
        return time.perf_counter() - t0
    return device_time_us(fn, args) * 1e-6


def jax_backend():
    import jax
    return jax.default_backend()


def candidates(m, k, n, bits, wide=False):
    """Kernel configs swept for a decode problem (kept small: every one costs a Triton compile)."""
    from jaxpass.kernels_pallas.quantized_matmul.config import TritonConfig
    bm = min(64, max(16, 1 << max(0, (m - 1).bit_length())))
    # Chosen from wider sweeps on the same H100 (docs/bench_matmul.md): the GEMV variant with
    # split-K wins at M = 1; the dot variant with 2-4 K splits at M = 16..64.
    if m <= 8:  # GEMV variant (block_m = rows per program, < 16) and one dot config
        grid = [(m, 64, 128, 4, 4, 3), (m, 16, 256, 4, 4, 3), (m, 32, 128, 8, 4, 3),
                (m, 64, 256, 8, 4, 3), (m, 32, 256, 4, 4, 1), (m, 64, 128, 4, 4, 1),
                (m, 128, 256, 4, 8, 3), (16, 32, 256, 4, 4, 3)]
        if wide:
            grid += [(m, 32, 512, 4, 8, 3), (m, 16, 512, 8, 4, 3), (m, 64, 128, 1, 4, 3),
                     (16, 64, 128, 2, 4, 3)]
    else:
        grid = [(bm, 64, 256, 4, 4, 3), (bm, 128, 128, 2, 8, 3), (bm, 64, 256, 2, 8, 3),
                (bm, 32, 128, 2, 4, 3), (bm, 64, 128, 2, 4, 3), (bm, 32, 256, 4, 4, 3)]
        if wide:
            grid += [(bm, 32, 128, 4, 4, 3), (bm, 64, 128, 1, 4, 3), (bm, 16, 256, 4, 4, 3)]
    out = []
    for bm_, bn, bk, split, warps, stages in grid:
        out.append(TritonConfig(bm_, bn, bk * (2 if bits == 8 else 1), split, warps, stages))
    if m == 1:  # the word GEMV: the best block shapes of scripts/sweep_gemv.py on the H100
        from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig
        shapes = [(32, 32, 8, 2), (64, 16, 8, 4), (128, 16, 8, 4), (64, 32, 4, 4), (32, 64, 4, 4),
                  (32, 64, 2, 4)]
        if n >= 32768:
            shapes = [(64, 32, 1, 4), (32, 64, 1, 4), (64, 16, 2, 4), (64, 16, 4, 4)]
        out = [GemvConfig(bn, bw, split, warps, 2) for bn, bw, split, warps in shapes] + out[:4]
    return out


def make_packed(key, k, n, fmt, copies):
    import jax
    import jax.numpy as jnp
    from jaxpass.kernels_pallas.quantized_matmul import layout
    from jaxpass.kernels_pallas.quantized_matmul.arg_specs import FORMATS
    bits, gs, sym = FORMATS[fmt]
    g = k // (gs or k)
    pack = jax.jit(functools.partial(layout.pack, bits=bits, group_size=gs))
    ws = []
    for c in range(copies):
        kq, ks = jax.random.split(jax.random.fold_in(key, c))
        lo, hi = (-128, 128) if bits == 8 else (-8, 8)
        q = jax.random.randint(kq, (k, n), lo, hi, jnp.int32).astype(jnp.int8)
        s = (jax.random.uniform(ks, (g, n), jnp.float32, 0.5, 1.5) / (8 * math.sqrt(k))
             ).astype(jnp.bfloat16)
        ws.append((pack(q, s),))
    return ws


def main():
    import jax
    import jax.numpy as jnp
    qmm = import_kernels()
    from jaxpass.kernels_pallas.quantized_matmul import (api, pallas_triton, pallas_triton_gemv,
                                                         reference, tuning)
    from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig
    from jaxpass.kernels_pallas.quantized_matmul.arg_specs import (ALL_M, DECODE_M, LLAMA3_8B_KN,
                                                                   SMOLLM2_KN)

    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="sweep configs for decode M, write table")
    ap.add_argument("--table", default="user",
                    help="where --tune records its choices: 'user' (this machine's cache, "
                         "tuning.user_table_path()), 'package' (the shipped tuned_configs.json) "
                         "or a file path")
    ap.add_argument("--wide", action="store_true", help="a wider config sweep")
    ap.add_argument("--quick", action="store_true", help="two shapes, decode M only")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (arg_specs)")
    ap.add_argument("--ms", default="", help="comma-separated M values")
    ap.add_argument("--formats", default="int4_g128_sym,int8_pc_sym")
    ap.add_argument("--cpu_smoke", action="store_true", help="tiny shapes, interpreter (no GPU)")
    ap.add_argument("--budget_s", type=float, default=520.0, help="stop starting new work after")
    args = ap.parse_args()
    table_path = {"user": tuning.user_table_path(), "package": tuning.TUNED_PATH}.get(
        args.table, args.table)
    t_start = time.time()
    out_dir = os.environ.get("OUT", "/tmp/bench_out")
    os.makedirs(out_dir, exist_ok=True)

    dev = jax.devices()[0]
    print("jax", jax.__version__, dev.device_kind, flush=True)
    bw = copy_bandwidth() if not args.cpu_smoke else 1e11
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)", flush=True)

    shapes, ms = LLAMA3_8B_KN, ALL_M
    if args.quick:
        shapes, ms = LLAMA3_8B_KN[:2], DECODE_M
    if args.shapes:
        keep = args.shapes.split(",")
        shapes = [s for s in LLAMA3_8B_KN + SMOLLM2_KN if s[0] in keep]
    if args.ms:
        ms = tuple(int(v) for v in args.ms.split(","))
    interp = args.cpu_smoke
    if interp:
        shapes, ms = [("tiny", 256, 384)], (1, 16, 128)
    fmts = args.formats.split(",")

    results, tuned = [], {}
    key = jax.random.PRNGKey(0)
    for name, k, n in shapes:
        if time.time() - t_start > args.budget_s:
            print(f"budget reached; skipping {name}", flush=True)
            continue
        # distinct weight copies per format, so that cycling through them never hits L2
        w16 = [((jax.random.normal(jax.random.fold_in(key, 50 + c), (k, n), jnp.float32)
                 / math.sqrt(k)).astype(jnp.bfloat16),) for c in range(copies_needed(2 * k * n))]
        w8 = [(jax.random.randint(jax.random.fold_in(key, 60 + c), (k, n), -128, 128)
               .astype(jnp.int8), jnp.full((1, n), 0.01, jnp.bfloat16))
              for c in range(copies_needed(k * n))]
        g4 = 128 if k % 128 == 0 else 64   # XLA int4 column: SmolLM2's 576 takes groups of 64
        w4 = [(jax.random.randint(jax.random.fold_in(key, 70 + c), (k, n), -8, 8)
               .astype(jnp.int4), jnp.full((k // g4, n), 0.01, jnp.bfloat16))
              for c in range(copies_needed(k * n // 2))]
        packed = {fmt: make_packed(key, k, n, fmt, copies_needed(k * n // (2 if "int4" in fmt else 1)))
                  for fmt in fmts}
        for m in ms:
            if time.time() - t_start > args.budget_s:
                print(f"budget reached; skipping {name} M{m}", flush=True)
                break
            xall = jax.random.normal(jax.random.fold_in(key, 900 + m), (4, m, k), jnp.bfloat16)
            xs = [xall[i] for i in range(4)]

            def bf16_op(x, w):
                return x @ w

            def xla8_op(x, wq, s):
                return ((x @ wq.astype(jnp.bfloat16)).astype(jnp.float32) * s).astype(jnp.bfloat16)

            def xla4_op(x, wq, s):
                w = (wq.astype(jnp.bfloat16).reshape(k // g4, g4, n) * s[:, None, :])
                return x @ w.reshape(k, n)

            row = dict(shape=name, m=m, k=k, n=n)
            row["bf16_us"] = 1e6 * time_per_op(bf16_op, xs, w16)
            row["xla_int8_us"] = 1e6 * time_per_op(xla8_op, xs, w8)
            row["xla_int4_us"] = 1e6 * time_per_op(xla4_op, xs, w4)
            for fmt in fmts:
                pws = packed[fmt]
                pw = pws[0][0]
                nbytes = pw.nbytes + 2 * m * k + 2 * m * n
                fb_us = 1e6 * time_per_op(reference.quantized_matmul_xla, xs, pws)
                row[f"{fmt}_fallback_us"] = fb_us
                tkey = tuning.key(fmt, jnp.bfloat16, m, k, n)
                if args.tune and m in DECODE_M:
                    best, sweep = None, []
                    for cfg in candidates(m, k, n, pw.bits, args.wide)[:(2 if interp else None)]:
                        if api.check_config(xs[0].shape, xs[0].dtype, pw, cfg):
                            continue
                        kernel = (pallas_triton_gemv.quantized_matmul_gemv
                                  if isinstance(cfg, GemvConfig) else
                                  pallas_triton.quantized_matmul_triton)
                        try:
                            f = functools.partial(kernel, config=cfg, interpret=interp)
                            t_us = 1e6 * time_per_op(f, xs, pws)
                        except Exception as ex:  # noqa: BLE001
                            print(f"  {cfg.short()} failed: {type(ex).__name__}: {str(ex)[:200]}")
                            continue
                        sweep.append((cfg.short(), round(t_us, 2)))
                        if best is None or t_us < best[1]:
                            best = (cfg, t_us)
                    row[f"{fmt}_sweep"] = sweep
                    if best is not None:
                        backend = api.backend_of(best[0]) if best[1] < fb_us else "xla"
                        tuned[tkey] = dict(backend=backend, config=best[0].to_dict(),
                                           kernel_us=round(best[1], 2), xla_us=round(fb_us, 2),
                                           bf16_us=round(row["bf16_us"], 2),
                                           device=dev.device_kind)
                    print(f"  {name} M{m} {fmt}: fallback {fb_us:.2f} sweep {sweep}", flush=True)
                elif args.tune:
                    tuned[tkey] = dict(backend="xla", config=None, xla_us=round(fb_us, 2),
                                       bf16_us=round(row["bf16_us"], 2), device=dev.device_kind)
                if args.tune and not interp:  # auto dispatch below reads the table tuned so far
                    tuning.record(tuned, dev.device_kind, table_path)
                sel = api.select_implementation(xs[0].shape, xs[0].dtype, pw,
                                                platform="gpu" if interp else None)
                t_us = 1e6 * time_per_op(functools.partial(qmm.quantized_matmul, interpret=interp),
                                         xs, pws)
                row[f"{fmt}_us"] = t_us
                row[f"{fmt}_backend"] = sel.backend + (
                    f":{sel.config.short()}" if sel.config is not None else "")
                row[f"{fmt}_gbps"] = nbytes / (t_us * 1e-6) / 1e9
                row[f"{fmt}_pct_bw"] = 100 * nbytes / (t_us * 1e-6) / bw
                row[f"{fmt}_x_bf16"] = row["bf16_us"] / t_us
            results.append(row)
            print(json.dumps({k_: (round(v, 2) if isinstance(v, float) else v)
                              for k_, v in row.items() if not k_.endswith("sweep")}), flush=True)
            del xall, xs
        del w16, w8, w4, packed

    with open(os.path.join(out_dir, "bench_results.json"), "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, copy_bw_gbps=bw / 1e9,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       argv=sys.argv, results=results), f, indent=1)
    if args.tune and not interp:   # a copy of the table this run wrote, beside its results
        tuning.record(tuning.read_entries(table_path), dev.device_kind,
                      os.path.join(out_dir, "tuned_configs.json"))

    print(f"\ndevice {dev.device_kind}, jax {jax.__version__}, copy bandwidth "
          f"{bw / 1e9:.0f} GB/s; times in us; x = speed-up over bf16; %bw of the copy bandwidth")
    cols = [f for f in ("int8_pc_sym", "int4_g128_sym", "int4_g64_sym") if f in fmts]
    hdr = "| shape | M | bf16 | xla int8 | xla int4 |"
    for f in cols:
        hdr += f" jp {f} | x bf16 | %bw | backend |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r_ in results:
        line = (f"| {r_['shape']} {r_['k']}x{r_['n']} | {r_['m']} | {r_['bf16_us']:.1f} | "
                f"{r_['xla_int8_us']:.1f} | {r_['xla_int4_us']:.1f} |")
        for f in cols:
            line += (f" {r_[f + '_us']:.1f} | {r_[f + '_x_bf16']:.2f} | {r_[f + '_pct_bw']:.0f} |"
                     f" {r_[f + '_backend']} |")
        print(line)
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
