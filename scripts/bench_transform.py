"""Transform speed: trace + passes on a Llama-3-8B-shaped model from abstract params.

Nothing is allocated: params are ``jax.ShapeDtypeStruct``s, so this measures jaxpass's own work
(tracing, provenance, pattern matching, re-tracing through the rewriting interpreter), which must
stay small next to XLA compile time and grow at most linearly with depth (constant with
scan-over-layers).

    python scripts/bench_transform.py            # prints a markdown table
    python scripts/bench_transform.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

import jaxpass
from jaxpass import passes

# Llama-3-8B shapes.
D, H, KV, HD, FFN, VOCAB = 4096, 32, 8, 128, 14336, 128256


def _layer_shapes():
    return {
        "attn_norm": (D,), "wq": (D, H * HD), "wk": (D, KV * HD), "wv": (D, KV * HD),
        "wo": (H * HD, D), "mlp_norm": (D,), "w_gate": (D, FFN), "w_up": (D, FFN),
        "w_down": (FFN, D),
    }


def abstract_params(n_layers: int, scan: bool, dtype=jnp.bfloat16):
    sds = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
    if scan:
        layers = {k: sds((n_layers,) + s) for k, s in _layer_shapes().items()}
    else:
        layers = [{k: sds(s) for k, s in _layer_shapes().items()} for _ in range(n_layers)]
    return {"embed": sds((VOCAB, D)), "layers": layers, "norm": sds((D,)), "lm_head": sds((D, VOCAB))}


def _rms(x, w):
    x32 = x.astype(jnp.float32)
    return (x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype) * w


def _rope(x, pos):
    half = HD // 2
    freq = 1.0 / (500000.0 ** (jnp.arange(half) / half))
    ang = pos[:, None].astype(jnp.float32) * freq[None]
    cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _block(h, lp, pos):
    b, s, _ = h.shape
    x = _rms(h, lp["attn_norm"])
    q = _rope((x @ lp["wq"]).reshape(b, s, H, HD), pos)
    k = _rope((x @ lp["wk"]).reshape(b, s, KV, HD), pos)
    v = (x @ lp["wv"]).reshape(b, s, KV, HD)
    k, v = jnp.repeat(k, H // KV, axis=2), jnp.repeat(v, H // KV, axis=2)
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(HD)
    att = jnp.where(jnp.tril(jnp.ones((s, s), bool)), att, -1e30)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(att, -1).astype(v.dtype), v)
    h = h + o.reshape(b, s, H * HD) @ lp["wo"]
    x = _rms(h, lp["mlp_norm"])
    return h + (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]


def llama(params, ids):
    pos = jnp.arange(ids.shape[1])
    h = params["embed"][ids]
    if isinstance(params["layers"], dict):
        h, _ = lax.scan(lambda h, lp: (_block(h, lp, pos), None), h, params["layers"])
    else:
        for lp in params["layers"]:
            h = _block(h, lp, pos)
    return (_rms(h, params["norm"]) @ params["lm_head"]).astype(jnp.float32)


def _time(fn, repeat):
    fn()  # warm up: first-use costs of jax's tracing machinery
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4,8,16,32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ids = jax.ShapeDtypeStruct((1, 128), jnp.int32)
    rows = []
    for scan in (False, True):
        for n in [int(d) for d in args.depths.split(",")]:
            params = abstract_params(n, scan)
            trace = _time(lambda: jax.make_jaxpr(lambda p, i: llama(p, i))(params, ids), args.repeat)  # fresh closure: no trace cache
            ident = _time(lambda: jaxpass.transform(llama, [], params=params, example_args=(ids,)), args.repeat)
            quant = _time(lambda: jaxpass.transform(llama, [passes.Quantize(weights="int8")],
                                                    params=params, example_args=(ids,)), args.repeat)
            t = jaxpass.transform(llama, [passes.Quantize(weights="int8")], params=params, example_args=(ids,))
            n_q = t.graph.count("jaxpass.quantized_dot_general")
            rows.append(dict(layout="scan" if scan else "unrolled", layers=n, make_jaxpr_s=trace,
                             transform_identity_s=ident, transform_int8_s=quant, quantized_matmuls=n_q))
            print(f"{rows[-1]['layout']:>8} L={n:>2}  make_jaxpr {trace:.3f}s  transform([]) {ident:.3f}s  "
                  f"transform([Quantize int8]) {quant:.3f}s  ({n_q} quantized matmuls)", flush=True)
    print()
    print(f"device: {platform.processor() or platform.machine()} CPU, {jax.device_count()} jax devices, "
          f"jax {jax.__version__}")
    print("| layout | layers | make_jaxpr (s) | transform, no passes (s) | transform, Quantize int8 (s) | quantized matmuls |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['layers']} | {r['make_jaxpr_s']:.3f} | {r['transform_identity_s']:.3f} | "
              f"{r['transform_int8_s']:.3f} | {r['quantized_matmuls']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
