"""End to end: decode tokens/s and what fits in a fixed memory budget, bf16 cache vs compressed.

    python scripts/bench_kv_generate.py --model 1b --batch 32 --prompt 2048 --steps 64 \
        --budget-gb 40 --fit-context 32768 --out /tmp/kv_e2e.json

For each cache (``--methods``, names of :data:`CACHES`): the model transformed with
``passes.CompressKV`` (or not, for ``bf16``), then

- ``kv_bytes_per_token``: bytes of ``t.init_cache(1, L)`` per token (abstract, exact);
- prefill / decode tokens/s of :func:`jaxpass.models.generate.time_generation` (the same jitted
  prefill and ``while_loop`` that ``generate`` runs; best of ``--repeats`` after warm-up);
- the largest batch at ``--fit-context`` tokens whose decode step fits ``--budget-gb``: estimated
  from the exact cache bytes plus the params, then checked by compiling the decode step at that
  batch (cache donated, as the ``generate`` loop carries it in place) and reading XLA's peak
  (``evaluate.peak_bytes``, nothing allocated); the first of 1, 0.85, 0.6, 0.3 x the estimate
  that fits is reported.

Random weights of the model's shape in bfloat16 (weights, activations and cache).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpass
from jaxpass import evaluate, models, passes
from jaxpass.models.generate import time_generation
from jaxpass.models.pure import pure_method

C = passes.CompressKV
CACHES = {
    "bf16": None,
    "int8": C(method="int8"),
    "kivi4": C(method="kivi", bits=4),
    "kivi2": C(method="kivi", bits=2),
    # the KIVI-2 options that meet the 6% target on SmolLM2 (docs/kv_cache.md)
    "kivi2-g16s4": C(method="kivi", bits=2, group_size=16, v_group_size=16,
                     full_precision_sinks=4),
    "int8-xla": C(method="int8", use_kernel=False),
    "kivi4-xla": C(method="kivi", bits=4, use_kernel=False),
    "snapkv25": C(method="snapkv", budget=0.25),
    "streaming25": C(method="streaming", budget=0.25),
    "h2o25": C(method="h2o", budget=0.25),
}


def build(name, dtype, layers):
    cfgs = {"1b": models.configs.llama32_1b, "8b": models.configs.llama3_8b,
            "smollm2": models.configs.smollm2_135m, "tiny": models.configs.tiny}
    over = dict(dtype=dtype, param_dtype=dtype)
    if layers:
        over["num_layers"] = layers
    return models.random_model(cfgs[name](**over))


def step_peak(m, batch, new_tokens, capacity, start):
    """XLA's peak bytes of one jitted ``forward_cached`` step: ``new_tokens`` tokens per row at
    position ``start`` into a cache of ``capacity`` (compiled, not run; cache donated, as the
    ``generate`` loop carries it in place)."""
    cache = jax.eval_shape(lambda: m.init_cache(batch, capacity))
    fn, params, state = pure_method(m, "forward_cached")
    ids = jax.ShapeDtypeStruct((batch, new_tokens), jnp.int32)
    return evaluate.peak_bytes(lambda p, c, i: fn(p, state, i, c, jnp.int32(start)),
                               params, cache, ids, donate_argnums=(1,))["peak"]


def decode_peak(m, batch, context):
    """Peak of one decode step at (batch, context)."""
    return step_peak(m, batch, 1, context, context - 1)


def prefill_peak(m, batch, prompt, capacity):
    """Peak of the prefill of ``batch`` x ``prompt`` tokens: what query-chunked attention keeps
    bounded."""
    return step_peak(m, batch, prompt, capacity, 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--layers", type=int, default=0, help="override the number of layers")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--methods", default=",".join(CACHES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=40.0)
    ap.add_argument("--fit-context", type=int, default=32768)
    ap.add_argument("--out", default="")
    ap.add_argument("--max-score-mb", type=float, default=0.0,
                    help="attention's query-chunking threshold (MiB of f32 scores; 0: the "
                         "library default, jaxpass.models.attention.max_score_bytes())")
    ap.add_argument("--no-fit", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--profile", action="store_true",
                    help="only: per-kernel device time of one decode step at --prompt tokens")
    args = ap.parse_args()
    if args.profile:
        return profile(args)

    if args.max_score_mb:
        models.attention.MAX_SCORE_BYTES = int(args.max_score_mb * 2 ** 20)
    model = build(args.model, args.dtype, args.layers)
    example = jnp.zeros((1, 16), jnp.int32)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.prompt))
    budget = args.budget_gb * 2 ** 30
    rows = []
    for name in args.methods.split(","):
        p = CACHES[name]
        m = model if p is None else jaxpass.transform(model, passes=[p], example_args=(example,))
        row = {"cache": name, "model": args.model, "layers": model.config.num_layers,
               "device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "batch": args.batch, "prompt": args.prompt,
               "max_score_bytes": models.attention.max_score_bytes()}
        L = args.fit_context
        per_token = evaluate.tree_bytes(jax.eval_shape(lambda: m.init_cache(1, L))) / L
        params = evaluate.param_bytes(model)
        row["kv_bytes_per_token"] = per_token
        t0 = time.time()
        try:
            row["prefill_peak_gb"] = prefill_peak(m, args.batch, args.prompt,
                                                  args.prompt + args.steps) / 2 ** 30
            r = time_generation(m, ids, args.steps, repeats=args.repeats)
            row.update(r)
        except Exception as e:  # report, keep measuring the other caches
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        # Largest batch at fit_context: estimate from exact bytes, then check XLA's peak.
        est = int((budget - params) // (per_token * L))
        fit = None
        for b in (est, int(est * 0.85), int(est * 0.6), int(est * 0.3)):
            if b < 1 or args.no_fit:
                continue
            try:
                peak = decode_peak(m, b, L)
            except Exception as e:
                row["fit_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                break
            if peak <= budget:
                fit = {"batch": b, "context": L, "peak_gb": peak / 2 ** 30}
                break
        row["fit"] = fit
        row["seconds"] = round(time.time() - t0, 1)
        row["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


def profile(args):
    """Device time of one decode step (cache at ``--prompt`` tokens, zeros: the work does not
    depend on the values) and its kernels, longest first. Not donated, so each call also copies
    the cache buffers it updates (the ``copy``/``dynamic-update-slice`` lines): read those as the
    price of the benchmark, not of the step."""
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_timing import device_time_us

    model = build(args.model, args.dtype, args.layers)
    example = jnp.zeros((1, 16), jnp.int32)
    ids = jnp.zeros((args.batch, 1), jnp.int32)
    for name in args.methods.split(","):
        p = CACHES[name]
        m = model if p is None else jaxpass.transform(model, passes=[p], example_args=(example,))
        cache = m.init_cache(args.batch, args.prompt + args.steps)
        fn, params, state = pure_method(m, "forward_cached")
        step = lambda p_, c, i: fn(p_, state, i, c, jnp.int32(args.prompt))
        t, kernels = device_time_us(step, [(params, cache, ids)], calls=20, breakdown=True)
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:14]
        print(json.dumps({"cache": name, "step_us": round(t, 1),
                          "kernels_us": {k: round(v, 1) for k, v in top}}), flush=True)


if __name__ == "__main__":
    main()
