"""GPU check and config sweep of the decode-attention kernels (run before bench_decode_attention).

1. Correctness on the GPU: every kernel (dense, int8, KIVI 4/2-bit) in bf16 and f32, ragged and
   per-head lengths (a one-token row included), GQA 4 and 3 (head dim 128 and 64), several
   configs, against the f32 reference over the same dequantized cache: ||o - ref|| / ||ref||,
   tolerance 1e-2 (bf16) / 1e-5 (f32, IEEE dots); non-finite fails.
2. Sweep at the issue's shape (batch 8, 32/8 heads, d 128) at 32K (then 128K and 4K, fewer
   configs): XLA (dequantize in graph) and each kernel config; the fastest config per
   (format, shape) goes to $OUT/tuned_configs.json (format of tuning.py), all timings to
   $OUT/tune_decode_attention.json.

    python scripts/tune_decode_attention.py            # on a CUDA GPU; table printed last

The first GPU call of 2026-11-22 ran this script with an earlier timer whose sweep timings were
invalid (see docs/decode_attention.md); it now times with ``bench_decode_attention.time_per_op``.
The recorded figures come from ``bench_decode_attention.py``, which also sweeps configs.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode_attention as bench  # noqa: E402
from gpu_kernel_check import rel_err  # noqa: E402

SWEEP = {  # (block_k, num_splits, num_warps, num_stages)
    "dense": [(64, 16, 4, 2), (128, 16, 4, 2), (128, 8, 4, 3), (128, 32, 4, 2), (256, 16, 8, 2),
              (64, 32, 4, 3)],
    "kivi": [(32, 16, 4, 2), (64, 16, 4, 2), (64, 32, 4, 3), (128, 16, 4, 2), (128, 8, 8, 2),
             (64, 8, 4, 3)],
}
SHORT = {"dense": [(128, 16, 4, 2), (64, 32, 4, 3), (128, 4, 4, 2)],
         "kivi": [(64, 16, 4, 2), (64, 32, 4, 3), (128, 4, 4, 2)]}


def check(DA, F):
    import jax
    import jax.numpy as jnp
    from jaxpass.kernels_pallas.decode_attention import pallas_triton
    results = []
    cases = [  # (b, kvh, g, L, d, lengths, configs)
        (3, 2, 4, 2048, 128, [2048, 1001, 1], [(64, 4, 4, 2), (128, 8, 4, 3), (32, 16, 4, 2)]),
        (2, 3, 3, 1024, 64, [[1024, 17, 500], [64, 1023, 1]], [(64, 4, 4, 2)]),
    ]
    fmts = {"dense": ("dense", {}), "int8": ("int8", {}),
            "kivi4": ("kivi", dict(bits=4, group_size=32, residual=128)),
            "kivi2": ("kivi", dict(bits=2, group_size=32, residual=128, v_group_size=32))}
    for ci, (b, kvh, g, L, d, lens, cfgs) in enumerate(cases):
        ks = jax.random.split(jax.random.PRNGKey(ci), 3)
        lens = jnp.array(lens, jnp.int32)
        for dt in (jnp.bfloat16, jnp.float32):
            k = (jax.random.normal(ks[0], (b, kvh, L, d)) * 1.5 + 0.3).astype(dt)
            v = jax.random.normal(ks[1], (b, kvh, L, d)).astype(dt)
            q = jax.random.normal(ks[2], (b, kvh * g, d)).astype(dt)
            for name, (kind, opts) in fmts.items():
                cache = F.from_dense(kind, k, v, lengths=lens, **opts)
                ref = DA.reference_decode_attention(q, cache, lens, scale=d ** -0.5)
                for cfg in cfgs:
                    cfg = DA.DecodeConfig(*cfg)
                    if kind == "kivi" and cfg.block_k < 32:
                        continue
                    if pallas_triton.check(q.shape, q.dtype, cache, cfg):
                        continue                      # the kernel refuses this shape (by design)
                    try:
                        out = DA.decode_attention(q, cache, lens, scale=d ** -0.5,
                                                  backend="triton", config=cfg)
                        err = rel_err(out, ref)
                    except Exception as e:  # noqa: BLE001  (reported, counted as a failure)
                        err, msg = float("inf"), f"{type(e).__name__}: {str(e)[:300]}"
                        print("ERROR", name, cfg, msg, flush=True)
                    tol = 1e-2 if dt == jnp.bfloat16 else 1e-5
                    xerr = rel_err(DA.decode_attention(q, cache, lens, scale=d ** -0.5,
                                                       backend="xla"), ref)
                    results.append(dict(case=ci, dtype=jnp.dtype(dt).name, format=name,
                                        config=cfg.to_dict(), rel_err=err, xla_rel_err=xerr,
                                        ok=bool(err <= tol)))
                    print(json.dumps(results[-1]), flush=True)
    return results


def sweep(DA, tuning, bw, L, configs, t_start, budget_s, names=("dense", "int8", "kivi4", "kivi2")):
    import jax
    import jax.numpy as jnp
    B, HQ, D = bench.B, bench.HQ, bench.D
    scale = D ** -0.5
    lengths = jnp.full((B,), L, jnp.int32)
    qs = [jax.random.normal(jax.random.PRNGKey(100 + i), (B, HQ, D), jnp.bfloat16)
          for i in range(16)]
    rows, tuned = [], {}
    for name in names:
        if time.time() - t_start > budget_s:
            print(f"budget reached; skip L={L} {name}", flush=True)
            continue
        n = None
        cache = bench.make_cache(name, L)
        n = bench.copies_for(cache.nbytes)
        copies = [cache] + [bench.make_cache(name, L, seed=s) for s in range(1, n)]
        r = bench.reps_for(cache.nbytes / bw * 2, n)
        xla = lambda q, c: DA.decode_attention(q, c, lengths, scale=scale, backend="xla")
        t_x = bench.time_per_op(xla, qs, copies, r)
        row = dict(L=L, format=name, nbytes=cache.nbytes, xla_us=t_x * 1e6, configs=[])
        fam = "kivi" if name.startswith("kivi") else "dense"
        default = tuning.default_config(cache, HQ // bench.KVH)
        cands = [DA.DecodeConfig(*c) for c in configs[fam]]
        if default not in cands:
            cands.append(default)
        for cfg in cands:
            if time.time() - t_start > budget_s:
                break
            try:
                op = lambda q, c, cfg=cfg: DA.decode_attention(q, c, lengths, scale=scale,
                                                               backend="triton", config=cfg)
                t = bench.time_per_op(op, qs, copies, r)
                row["configs"].append(dict(config=cfg.to_dict(), us=t * 1e6,
                                           gbps=cache.nbytes / t / 1e9,
                                           default=cfg == default))
            except Exception as e:  # noqa: BLE001
                row["configs"].append(dict(config=cfg.to_dict(), error=str(e)[:300]))
            print(json.dumps(row["configs"][-1]), flush=True)
        ok = [c for c in row["configs"] if "us" in c]
        if ok:
            best = min(ok, key=lambda c: c["us"])
            row["best"] = best
            tuned[tuning.key(cache, HQ // bench.KVH)] = dict(
                config=best["config"], us=round(best["us"], 1),
                device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        print(f"L={L} {name} xla {t_x * 1e6:.1f} us best "
              f"{row.get('best', {}).get('us', float('nan')):.1f} us", flush=True)
        del copies, cache
    return rows, tuned


def main():
    t_start = time.time()
    import jax
    bench.import_kernels()
    from jaxpass.kernels_pallas import decode_attention as DA
    from jaxpass.kernels_pallas.decode_attention import formats as F, tuning
    out_dir = os.environ.get("OUT", ".")
    dev = jax.devices()[0].device_kind
    print("jax", jax.__version__, dev, flush=True)
    checks = check(DA, F)
    bw, _ = bench.copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows, tuned = [], {}
    for L, cfgs in ((32768, SWEEP), (131072, SHORT), (4096, SHORT)):
        r_, t_ = sweep(DA, tuning, bw, L, cfgs, t_start, budget_s=250)
        rows += r_
        tuned.update(t_)
        with open(os.path.join(out_dir, "tune_decode_attention.json"), "w") as f:
            json.dump(dict(device=dev, jax=jax.__version__, copy_gbps=bw / 1e9, checks=checks,
                           rows=rows), f, indent=1)
        with open(os.path.join(out_dir, "tuned_configs.json"), "w") as f:
            json.dump(tuned, f, indent=1, sort_keys=True)
    bad = [c for c in checks if not c["ok"]]
    print(f"\nchecks: {len(checks) - len(bad)}/{len(checks)} ok; worst bf16 "
          f"{max(c['rel_err'] for c in checks if c['dtype'] == 'bfloat16'):.2e}, worst f32 "
          f"{max(c['rel_err'] for c in checks if c['dtype'] == 'float32'):.2e}")
    for c in bad:
        print("  FAIL", c)
    print(f"copy {bw / 1e9:.0f} GB/s; {dev}")
    for row in rows:
        best = row.get("best")
        cfgs = " ".join(f"{c['config']['block_k']}/{c['config']['num_splits']}/"
                        f"{c['config']['num_warps']}/{c['config']['num_stages']}="
                        f"{c.get('us', float('nan')):.0f}" for c in row["configs"])
        print(f"L={row['L']:>6} {row['format']:>6} {row['nbytes'] / 1e6:7.1f}MB xla "
              f"{row['xla_us']:7.1f} best {best['us'] if best else float('nan'):7.1f} "
              f"({100 * row['nbytes'] / (best['us'] * 1e-6) / bw if best else 0:4.1f}% copy) "
              f"| {cfgs}")


if __name__ == "__main__":
    main()
