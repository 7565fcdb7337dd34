"""Wall time of one layer's causal prefill attention, whole vs in query chunks.

``jaxpass.models.attention`` splits the queries of an attention call into chunks when its float32
scores would pass ``max_score_bytes()`` (per-backend default). This times the model's
``causal_attention`` at one shape for several thresholds (``--mib``; 0 = never chunk), best of
``--repeats`` after a warm-up, on the default backend, and checks each result against the
unchunked one. ``--op slots`` times CompressKV's slot attention instead (a prefill of
``--tokens`` new tokens into ``--tokens + 8`` stored slots, as a quantized cache's prefill
runs): once with every slot empty (a fresh prompt: the branch that skips the slots) and once
with one slot filled (the branch that attends to the slots too), at the default threshold.

    python scripts/bench_prefill_attention.py --tokens 8192 --heads 9 --kv-heads 3 --head-dim 64
    python scripts/bench_prefill_attention.py --op slots --tokens 4096
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
    ap.add_argument("--op", choices=("model", "slots"), default="model")
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
    if args.op == "slots":
        return time_slots(q, k, v, args.repeats)
    ref = None
    for mib in (int(m) for m in args.mib.split(",")):
        attention.MAX_SCORE_BYTES = 2 ** 62 if mib == 0 else mib * 2 ** 20
        fn = jax.jit(lambda q, k, v: attention._causal_attention(q, k, v, scale=0.125))
        best = best_time(fn, (q, k, v), args.repeats)
        out = fn(q, k, v)
        ref = out if ref is None else ref
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        label = "whole" if mib == 0 else f"{mib} MiB chunks"
        print(f"  {label:>16}: {best:8.3f} s   max |diff| vs first {err:.1e}", flush=True)
    attention.MAX_SCORE_BYTES = None
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               rtol=1e-4, atol=1e-4)


def best_time(fn, args, repeats):
    """Best wall time of ``fn(*args)`` over ``repeats`` calls after a warm-up."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def time_slots(q, k, v, repeats):
    """CompressKV's slot attention for a prefill into ``t + 8`` slots: empty vs one filled."""
    from jaxpass.passes.compress_kv import attend as slot_attend
    b, t, _, d = q.shape
    kvh = k.shape[2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    slots_k = jnp.zeros((b, kvh, t + 8, d), q.dtype)
    new = slot_attend.new_tokens(slots_k, slots_k, k, v, positions)
    fn = jax.jit(lambda q, sk, pos: slot_attend.attend(q, sk, sk, pos, positions, scale=0.125,
                                                       new=new))
    empty = jnp.full((b, kvh, t + 8), -1, jnp.int32)
    for label, pos in (("every slot empty", empty), ("one slot filled", empty.at[:, :, 0].set(0))):
        print(f"  {label:>16}: {best_time(fn, (q, slots_k, pos), repeats):8.3f} s", flush=True)


if __name__ == "__main__":
    main()
