"""Bytes of the sparse formats on SmolLM2-135M's real weights (CPU; no timing).

Runs ``transform(model, [Sparsify(...), (Quantize(...)), LowerToPallas(backend="xla")])`` and reads
from the LowerToPallas report, per format, the bytes of the weights it packed against their dense
bytes (f32 as loaded, and the bf16 equivalent: 2 bytes per weight), and for the bitmap format the
padding share (the values array is padded per column to the largest column's nonzero count).
Writes ``--out`` (JSON).

    python scripts/sparse_format_bytes.py --out docs/sparse_format_bytes_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    import jax.numpy as jnp
    import numpy as np
    import jaxpass
    from jaxpass import models, passes
    from jaxpass.passes.sparsify.lowering import BitmapLinear, Int424Linear, Sparse24Linear

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = models.smollm2()
    ids = jnp.asarray([tok.encode("The quick brown fox jumps over the lazy dog.")[:8]], jnp.int32)
    recipes = {
        "bitmap_70": [passes.Sparsify(sparsity=0.7)],
        "bitmap_50": [passes.Sparsify(sparsity=0.5)],
        "2:4": [passes.Sparsify(pattern="2:4")],
        "int4_g64+2:4": [passes.Sparsify(pattern="2:4"), passes.Quantize(weights="int4", group_size=64, symmetric=True)],
    }
    rows = {}
    for name, ps in recipes.items():
        t0 = time.time()
        t = jaxpass.transform(model, ps + [passes.LowerToPallas(backend="xla")], example_args=(ids,))
        leaves = [v for v in jaxpass_leaves(t.params) if isinstance(v, (BitmapLinear, Int424Linear, Sparse24Linear))]
        weights = sum(int(np.prod(v.shape)) for v in leaves)
        stored = sum(v.packed.nbytes for v in leaves)
        row = dict(weights_packed=len(leaves), n_weights=weights, stored_bytes=stored,
                   bytes_per_weight=stored / max(weights, 1), vs_bf16=2 * weights / max(stored, 1),
                   skipped=[f"{w}: {y}" for w, y in t.report[-1].skipped][:6], seconds=time.time() - t0)
        if name.startswith("bitmap"):
            pad = sum(v.packed.padding_bytes for v in leaves)
            row.update(padding_bytes=pad, padding_share=pad / max(stored, 1),
                       sparsity=1 - sum(v.packed.nnz for v in leaves) / max(weights, 1))
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(model="SmolLM2-135M-Instruct", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       jax=__import__("jax").__version__, rows=rows), f, indent=1)


def jaxpass_leaves(params):
    import jax
    from jaxpass.core.values import is_structured
    return jax.tree_util.tree_leaves(params, is_leaf=is_structured)


if __name__ == "__main__":
    main()
