"""Wall time of one layer's causal prefill attention, whole vs in query chunks.

``jaxpass.models.attention`` splits the queries of an attention call into chunks when its float32
scores would pass ``max_score_bytes()`` (per-backend default). This times the model's
``causal_attention`` at one shape for several thresholds (``--mib``; 0 = never chunk), best of
``--repeats`` after a warm-up, on the default backend, and checks each result against the
unchunked one.

    python scripts/bench_prefill_attention.py --tokens 8192 --heads 9 --kv-heads 3 --head-dim 64
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.models import attention


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mib", default="0,64,256,1024")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    b, t, dt = args.batch, args.tokens, jnp.dtype(args.dtype)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, args.heads, args.head_dim), dt)
    k = jax.random.normal(ks[1], (b, t, args.kv_heads, args.head_dim), dt)
    v = jax.random.normal(ks[2], (b, t, args.kv_heads, args.head_dim), dt)
    scores_mib = 4 * b * args.heads * t * t / 2 ** 20
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: b={b} t={t} "
          f"heads={args.heads}/{args.kv_heads} d={args.head_dim} {dt.name}; "
          f"whole scores {scores_mib:.0f} MiB")
    ref = None
    for mib in (int(m) for m in args.mib.split(",")):
        attention.MAX_SCORE_BYTES = 2 ** 62 if mib == 0 else mib * 2 ** 20
        fn = jax.jit(lambda q, k, v: attention._causal_attention(q, k, v, scale=0.125))
        out = fn(q, k, v).block_until_ready()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn(q, k, v).block_until_ready()
            best = min(best, time.perf_counter() - t0)
        ref = out if ref is None else ref
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        label = "whole" if mib == 0 else f"{mib} MiB chunks"
        print(f"  {label:>16}: {best:8.3f} s   max |diff| vs first {err:.1e}", flush=True)
    attention.MAX_SCORE_BYTES = None
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    main()
