"""Benchmarks decode attention on the GPU: jaxpass kernels against XLA, per KV cache format.

Shape (issue 7): batch 8, 32 query / 8 KV heads, head dim 128, bf16 queries, every row full
(lengths = capacity), contexts 4K, 32K and 128K. Columns per format (dense bf16, int8, KIVI 4-bit
and 2-bit with G=32 / R=128 / Gv=128, sparse Mustafar at 50%):

* ``xla_bf16``: XLA attention over the dense bf16 cache (the same for every row of a context);
* ``xla_fmt``: XLA with the format's cache dequantized in the graph (``backend="xla"``);
* ``jaxpass``: ``decode_attention`` with the Pallas Triton kernel: at 32K the best of the
  ``CANDIDATES`` configs and ``tuning.default_config`` swept in this run, at 4K / 128K the best of
  (32K's best, default); the winners are written to ``$OUT/tuned_configs.json`` (copy it to
  jaxpass/kernels_pallas/decode_attention/ for ``backend="auto"``); ``kivi4b`` is KIVI 4-bit
  with bf16 scales/mins (32K only);
* achieved GB/s = ``cache.nbytes`` / time (every byte of the cache is read once per step), and
  that as % of the copy bandwidth (``a + 1`` on 2 GiB, read + write) and of the read bandwidth (a
  sum over 2 GiB) measured in the same run.

Before timing, ``gpu_check`` compares every kernel (f32 and bf16, ragged lengths with a one-token
row) with the f32 reference over the same dequantized cache.

Timing (``time_per_op``): R calls per executable, each with its own query and a rotating set of
cache copies (so no call is served from the 50 MB L2); all outputs are returned, so XLA can neither
merge nor slice calls; 12 executables are enqueued back to back and the median over 5 repeats of
total / calls is reported (device work per executable >= ~0.3 ms hides the dispatch).

    python scripts/bench_decode_attention.py                       # on a CUDA GPU; table last
    python scripts/bench_decode_attention.py --contexts 32768 --formats dense,int8
Results: $OUT/bench_decode_attention.json. Config sweeps and GPU correctness checks:
scripts/tune_decode_attention.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_kernel_check import import_kernels, rel_err  # noqa: E402  (also sets the package path)

B, HQ, KVH, D = 8, 32, 8, 128
FORMATS = {
    "dense": ("dense", {}),
    "int8": ("int8", {}),
    "kivi4": ("kivi", dict(bits=4, group_size=32, residual=128)),
    "kivi4b": ("kivi", dict(bits=4, group_size=32, residual=128, stats_dtype="bfloat16")),
    "kivi2": ("kivi", dict(bits=2, group_size=32, residual=128)),
    # value groups of 64 channels over 32 packed bytes per row: a group spans two planes
    "kivi2g64": ("kivi", dict(bits=2, group_size=32, residual=128, v_group_size=64)),
    "sparse": ("sparse", dict(sparsity=0.5)),
}
L2_BYTES = 50e6


def time_per_op(op, qs, caches, r, n_exec=12, reps=5):
    """Seconds per ``op(q, cache)``: one executable of ``r`` calls (call ``i``: its own query
    ``qs[i]``, cache ``caches[i % len]``; every output is returned, so XLA can neither merge nor
    slice calls), enqueued ``n_exec`` times back to back; median over ``reps`` of total / calls.
    Dispatch overlaps the device work when an executable runs longer than its dispatch (r is
    chosen for >= ~1 ms per executable), so it is not counted."""
    import jax

    @jax.jit
    def run(qs_, caches_):
        return [op(qs_[i], caches_[i % len(caches_)]) for i in range(r)]

    args = (qs[:r], caches)
    jax.block_until_ready(run(*args))
    jax.block_until_ready(run(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [run(*args) for _ in range(n_exec)]
        jax.block_until_ready(outs)
        ts.append((time.perf_counter() - t0) / (n_exec * r))
    return statistics.median(ts)


def copy_bandwidth():
    """(copy, read) bytes/s of a 2 GiB bf16 array: ``a + 1`` (read + write counted) and a sum
    (read only)."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 30,), jnp.bfloat16)
    nb = (1 << 30) * 2

    def med(f, a):
        jax.block_until_ready(f(a))
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready([f(a) for _ in range(5)])
            ts.append((time.perf_counter() - t0) / 5)
        return statistics.median(ts)

    t_copy = med(jax.jit(lambda a: a + jnp.bfloat16(1)), x)
    t_read = med(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x)
    del x
    return 2 * nb / t_copy, nb / t_read


def make_cache(name, L, seed=0):
    """Random (never zero) bf16 K/V of shape [B, KVH, L, D] in format ``name``, full rows."""
    import jax
    import jax.numpy as jnp
    from jaxpass.kernels_pallas.decode_attention import formats as F
    kind, opts = FORMATS[name]
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    k = (jax.random.normal(k1, (B, KVH, L, D), jnp.float32) + 0.5).astype(jnp.bfloat16)
    v = jax.random.normal(k2, (B, KVH, L, D), jnp.bfloat16)
    cache = jax.jit(lambda k_, v_: F.from_dense(kind, k_, v_, **opts))(k, v)
    jax.block_until_ready(cache)
    return cache


def copies_for(nbytes):
    """Cache copies to rotate so that a call never finds its cache in the 50 MB L2."""
    return int(min(8, max(1, -(-4 * L2_BYTES // nbytes))))


def reps_for(est_s, copies=1):
    """Calls per executable: >= ~0.3 ms of device work (hides Python dispatch), at least one per
    cache copy, at most 8 (each call is one more kernel to compile)."""
    return int(max(copies, min(8, max(1, round(3e-4 / max(est_s, 1e-6))))))


CANDIDATES = {  # (block_k, num_splits, num_warps, num_stages[, kivi_block]), swept at 32K
    "dense": [(64, 32, 4, 3), (64, 16, 4, 2), (128, 16, 4, 3)],
    "int8": [(64, 32, 4, 3), (128, 16, 4, 3), (128, 8, 4, 3), (64, 32, 4, 2), (32, 32, 4, 3),
             (64, 64, 4, 3), (32, 64, 2, 3)],
    "sparse": [(32, 32, 4, 2), (16, 64, 4, 2), (32, 16, 4, 2), (64, 16, 4, 2)],
    # kivi_block 1 / 2: keys dequantized per block, one dot per plane; 3: scales on the query
    # side, one dot per plane for all groups of a block (pallas_triton.py)
    "kivi": [(64, 32, 4, 3), (128, 16, 4, 2, 1), (128, 16, 4, 3, 1), (128, 16, 4, 2, 2),
             (128, 16, 4, 3, 2), (128, 8, 4, 2, 1), (128, 16, 4, 3, 3), (64, 32, 4, 3, 3)],
}


def family(name):
    return "kivi" if name.startswith("kivi") else name


def gpu_check(DA, F):
    """f32 (IEEE dots: tolerance 1e-5) and bf16 (1e-2) kernel vs reference on the GPU, ragged
    lengths with a one-token row, before any timing; 4 splits of 2048 rows, and 3 (rows 704,
    704, 640: a count that does not divide) with 4 full-precision sink rows (``sinks=``)."""
    import jax
    import jax.numpy as jnp
    b, kvh, g, L, d = 3, 2, 4, 2048, 128
    ks = jax.random.split(jax.random.PRNGKey(7), 3)
    lens = jnp.array([2048, 1001, 1], jnp.int32)
    out = []
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
        k = (jax.random.normal(ks[0], (b, kvh, L, d)) * 1.5 + 0.3).astype(dt)
        v = jax.random.normal(ks[1], (b, kvh, L, d)).astype(dt)
        q = jax.random.normal(ks[2], (b, kvh * g, d)).astype(dt)
        for name in ("dense", "int8", "kivi4", "kivi4b", "kivi2", "kivi2g64", "sparse"):
            kind, opts = FORMATS[name]
            cache = F.from_dense(kind, k, v, lengths=lens, **opts)
            ref = DA.reference_decode_attention(q, cache, lens, scale=d ** -0.5)
            sinks = (k[:, :, :4] * 0.5, v[:, :, :4] + 0.5)
            ref_s = DA.reference_decode_attention(q, cache, lens, scale=d ** -0.5, sinks=sinks)
            for kb in ((0, 1, 2, 3) if kind == "kivi" else (0,)):
                for splits, snk, want in ((4, None, ref), (3, sinks, ref_s)):
                    o = DA.decode_attention(q, cache, lens, scale=d ** -0.5, backend="triton",
                                            config=DA.DecodeConfig(64, splits, 4, 2, kivi_block=kb),
                                            sinks=snk)
                    err = rel_err(o, want)
                    label = name + (f"/block{kb}" if kb else "") + ("/3splits+sinks" if snk else "")
                    out.append(dict(dtype=jnp.dtype(dt).name, format=label, rel_err=err,
                                    ok=bool(err <= tol)))
                    print(json.dumps(out[-1]), flush=True)
    return out


def main(argv=None):
    global B, HQ, KVH, D
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,4096,131072")
    ap.add_argument("--formats", default="dense,int8,kivi4,kivi4b,kivi2,sparse")
    ap.add_argument("--budget_s", type=float, default=300.0)
    ap.add_argument("--candidates", default="",
                    help='JSON replacing CANDIDATES entries, e.g. \'{"int8": [[64, 32, 2, 3]]}\'')
    ap.add_argument("--shape", default="",
                    help="batch,q_heads,kv_heads,head_dim (default 8,32,8,128)")
    ap.add_argument("--skip_check", action="store_true",
                    help="no GPU correctness check first (a sweep right after a checked run)")
    args = ap.parse_args(argv)
    if args.shape:
        B, HQ, KVH, D = (int(x) for x in args.shape.split(","))
    if args.candidates:
        CANDIDATES.update({k: [tuple(c) for c in v] for k, v in json.loads(args.candidates).items()})
    t_start = time.time()
    import jax
    import jax.numpy as jnp
    import_kernels()
    from jaxpass.kernels_pallas import decode_attention as DA
    from jaxpass.kernels_pallas.decode_attention import formats as F, tuning

    out_dir = os.environ.get("OUT", ".")
    dev = jax.devices()[0].device_kind
    print("jax", jax.__version__, dev, flush=True)
    checks = []
    if jax.default_backend() == "gpu" and not args.skip_check:
        try:
            checks = gpu_check(DA, F)
        except Exception as e:  # noqa: BLE001  (reported; the timings still run)
            print("GPU CHECK ERROR", type(e).__name__, str(e)[:2000], flush=True)
            checks = [dict(dtype="-", format="gpu_check", rel_err=float("inf"), ok=False)]
    bw, bw_read = copy_bandwidth()
    print(f"copy {bw / 1e9:.0f} GB/s, read {bw_read / 1e9:.0f} GB/s", flush=True)
    scale = D ** -0.5
    rows, tuned, best_cfg = [], {}, {}
    qs = [jax.random.normal(jax.random.PRNGKey(100 + i), (B, HQ, D), jnp.bfloat16)
          for i in range(16)]
    contexts = [int(x) for x in args.contexts.split(",")]

    def save():
        result = dict(device=dev, jax=jax.__version__, copy_gbps=bw / 1e9,
                      read_gbps=bw_read / 1e9, date=time.strftime("%Y-%m-%d"), checks=checks,
                      rows=rows)
        with open(os.path.join(out_dir, "bench_decode_attention.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out_dir, "tuned_configs.json"), "w") as f:
            json.dump(tuned, f, indent=1, sort_keys=True)

    for L in contexts:
        lengths = jnp.full((B,), L, jnp.int32)
        dense = make_cache("dense", L)
        nd = copies_for(dense.nbytes)
        dense_copies = [dense] + [make_cache("dense", L, seed=s) for s in range(1, nd)]
        xla_op = lambda q, c: DA.decode_attention(q, c, lengths, scale=scale, backend="xla")
        t_bf16 = time_per_op(xla_op, qs, dense_copies, reps_for(dense.nbytes / bw * 2, nd))
        print(f"L={L} xla_bf16 {t_bf16 * 1e6:.1f} us", flush=True)
        for name in args.formats.split(","):
            if name == "kivi4b" and L != 32768:
                continue
            if time.time() - t_start > args.budget_s:
                print(f"budget reached; skipping L={L} {name}", flush=True)
                continue
            cache = dense if name == "dense" else make_cache(name, L)
            n = copies_for(cache.nbytes)
            copies = dense_copies[:n] if name == "dense" else (
                [cache] + [make_cache(name, L, seed=s) for s in range(1, n)])
            r = reps_for(cache.nbytes / bw * 2, n)
            t_x = time_per_op(xla_op, qs, copies, r)
            groups = HQ // KVH
            row = dict(L=L, format=name, nbytes=cache.nbytes, xla_bf16_us=t_bf16 * 1e6,
                       xla_fmt_us=t_x * 1e6, copies=n, calls_per_exec=r, sweep=[])
            # Sweep the kernel wherever it can run, whatever the tuned table chose last time.
            from jaxpass.kernels_pallas.decode_attention import pallas_triton
            why_not = pallas_triton.check(qs[0].shape, qs[0].dtype, cache,
                                          tuning.default_config(cache, HQ // KVH))
            if why_not is None:
                default = tuning.default_config(cache, groups)
                if L == 32768 or args.candidates:   # given candidates: swept at every L
                    cands = [DA.DecodeConfig(*c) for c in CANDIDATES[family(name)]]
                else:
                    cands = [best_cfg.get(name, default)]
                if default not in cands:
                    cands.append(default)
                for cfg in cands:
                    if pallas_triton.check(qs[0].shape, qs[0].dtype, cache, cfg):
                        continue
                    op = lambda q, c, cfg=cfg: DA.decode_attention(
                        q, c, lengths, scale=scale, backend="triton", config=cfg)
                    try:
                        t = time_per_op(op, qs, copies, r)
                        row["sweep"].append(dict(config=cfg.to_dict(), us=t * 1e6,
                                                 default=cfg == default))
                    except Exception as e:  # noqa: BLE001  (reported in the table)
                        row["sweep"].append(dict(config=cfg.to_dict(), error=str(e)[:300]))
                    print(json.dumps(row["sweep"][-1]), flush=True)
                ok = [c for c in row["sweep"] if "us" in c]
                if ok:
                    best = min(ok, key=lambda c: c["us"])
                    cfg = DA.DecodeConfig.from_dict(best["config"])
                    best_cfg[name] = cfg
                    o = DA.decode_attention(qs[0], cache, lengths, scale=scale,
                                            backend="triton", config=cfg)
                    ref = DA.reference_decode_attention(qs[0], cache, lengths, scale=scale)
                    t_k = best["us"] * 1e-6
                    row.update(jaxpass_us=best["us"], config=best["config"],
                               rel_err=rel_err(o, ref), gbps=cache.nbytes / t_k / 1e9,
                               pct_copy=100 * cache.nbytes / t_k / bw,
                               pct_read=100 * cache.nbytes / t_k / bw_read)
                    if name != "kivi4b":
                        tuned[tuning.key(cache, groups)] = dict(
                            config=best["config"], us=round(best["us"], 1), device=dev,
                            date=time.strftime("%Y-%m-%d"))
            else:
                row["reason"] = why_not
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sweep"}), flush=True)
            save()
            del copies, cache
        del dense_copies, dense
    save()
    bad = [c for c in checks if not c["ok"]]
    print(f"\nGPU checks: {len(checks) - len(bad)}/{len(checks)} ok "
          + " ".join(f"{c['format']}/{c['dtype'][:4]}={c['rel_err']:.1e}" for c in checks))
    print(f"device {dev}, jax {jax.__version__}, copy {bw / 1e9:.0f} GB/s (read+write), "
          f"read-only {bw_read / 1e9:.0f} GB/s; B={B} HQ={HQ} KVH={KVH} D={D}; times in us")
    print(f"{'L':>6} {'format':>6} {'MB':>7} {'xla_bf16':>8} {'xla_fmt':>8} {'jaxpass':>8} "
          f"{'GB/s':>5} {'%copy':>5} {'%read':>5} {'rel_err':>7}  config (bk/splits/warps/stages) "
          f"| sweep")
    for r_ in rows:
        jp = r_.get("jaxpass_us")
        if jp:
            c = r_["config"]
            sw = " ".join(f"{x['config']['block_k']}/{x['config']['num_splits']}/"
                          f"{x['config']['num_warps']}/{x['config']['num_stages']}"
                          f"{'b%d' % x['config']['kivi_block'] if x['config'].get('kivi_block') else ''}="
                          f"{x.get('us', float('nan')):.0f}{'*' if x.get('default') else ''}"
                          for x in r_["sweep"])
            cols = (f"{jp:8.1f} {r_['gbps']:5.0f} {r_['pct_copy']:5.0f} {r_['pct_read']:5.0f} "
                    f"{r_['rel_err']:7.1e}  {c['block_k']}/{c['num_splits']}/{c['num_warps']}/"
                    f"{c['num_stages']}{'b%d' % c['kivi_block'] if c.get('kivi_block') else ''} | {sw}")
        else:
            cols = f"{'-':>8} {'-':>5} {'-':>5} {'-':>5} {'-':>7}  {r_.get('reason', '')}"
        print(f"{r_['L']:>6} {r_['format']:>6} {r_['nbytes'] / 1e6:>7.1f} "
              f"{r_['xla_bf16_us']:>8.1f} {r_['xla_fmt_us']:>8.1f} {cols}")


if __name__ == "__main__":
    main()
