"""Runs every GPU kernel of jaxpass.kernels_pallas against its reference, on the GPU.

Random inputs (never zeros), ragged and aligned shapes, int4 sym/asym, int8, groups 32/64/128 and
per-channel, bf16 and f32 activations, split-K on and off, GEMV and dot variants, and the W8A8
kernel. Outputs are fresh buffers; a non-finite value anywhere fails the case, and an element the
kernel failed to write shows up as a large error against the (random, nonzero) reference.
Error is ||y - ref|| / ||ref|| against the f32 HIGHEST-precision reference; tolerances: 1e-2 for
bf16 outputs, 1e-5 for f32 (the kernel's dot is IEEE f32 there). Prints a pass/fail table last.

    python scripts/gpu_kernel_check.py            # on a CUDA GPU
"""

from __future__ import annotations

import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_kernels():
    """Imports the kernel package without running jaxpass/__init__ (which may need flax)."""
    sys.path.insert(0, ROOT)
    if "jaxpass" not in sys.modules:
        mod = types.ModuleType("jaxpass")
        mod.__path__ = [os.path.join(ROOT, "jaxpass")]
        sys.modules["jaxpass"] = mod
    import jaxpass.kernels_pallas.quantized_matmul as qmm
    return qmm


def rel_err(y, ref):
    import numpy as np
    y = np.asarray(y, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y)):
        return float("inf")
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def make_weight(key, k, n, bits, group_size, symmetric, scale_dtype):
    import jax
    import jax.numpy as jnp
    from jaxpass.kernels_pallas.quantized_matmul import layout
    g = k // (group_size or k)
    kq, ks, kz = jax.random.split(key, 3)
    if bits == 8:
        q = jax.random.randint(kq, (k, n), -128, 128)
    elif symmetric:
        q = jax.random.randint(kq, (k, n), -8, 8)
    else:
        q = jax.random.randint(kq, (k, n), 0, 16)
    s = jax.random.uniform(ks, (g, n), jnp.float32, 0.5, 1.5) / (8.0 * (k ** 0.5))
    z = None if symmetric else jax.random.randint(kz, (g, n), 0, 16).astype(jnp.float32)
    return layout.pack(q.astype(jnp.int8), s.astype(scale_dtype), z, bits=bits,
                       group_size=group_size)


def main():
    import jax
    import jax.numpy as jnp
    qmm = import_kernels()
    from jaxpass.kernels_pallas.quantized_matmul import pallas_triton, reference
    from jaxpass.kernels_pallas.quantized_matmul.config import Int8Config, TritonConfig

    print("jax", jax.__version__, jax.devices())
    key = jax.random.PRNGKey(0)
    cases = [
        # (M, K, N, bits, group, sym, x dtype, config)
        (1, 4096, 4096, 4, 128, True, jnp.bfloat16, TritonConfig(16, 32, 128, 1, 4, 3)),
        (1, 4096, 4096, 4, 128, True, jnp.bfloat16, TritonConfig(16, 64, 256, 4, 4, 3)),
        (7, 1024, 1000, 4, 64, False, jnp.bfloat16, TritonConfig(16, 64, 128, 2, 4, 3)),
        (33, 512, 320, 4, 32, True, jnp.bfloat16, TritonConfig(64, 32, 64, 1, 4, 3)),
        (16, 576, 1536, 4, None, True, jnp.bfloat16, TritonConfig(16, 64, 128, 1, 4, 3)),
        (5, 2048, 512, 4, 128, False, jnp.float32, TritonConfig(16, 32, 128, 1, 4, 3)),
        (1, 4096, 14336, 8, None, True, jnp.bfloat16, TritonConfig(16, 64, 256, 1, 4, 3)),
        (16, 4096, 4096, 8, 128, True, jnp.bfloat16, TritonConfig(16, 32, 256, 2, 4, 3)),
        (64, 1536, 700, 8, 64, False, jnp.bfloat16, TritonConfig(64, 64, 128, 1, 4, 3)),
        (3, 1024, 256, 8, None, True, jnp.float32, TritonConfig(16, 32, 128, 1, 4, 3)),
        (200, 1024, 512, 4, 128, True, jnp.bfloat16, TritonConfig(64, 64, 128, 1, 4, 3)),
        # GEMV variant (block_m < 16)
        (1, 4096, 4096, 4, 128, True, jnp.bfloat16, TritonConfig(1, 64, 128, 1, 4, 3)),
        (3, 1024, 1000, 4, 64, False, jnp.bfloat16, TritonConfig(4, 32, 128, 2, 4, 3)),
        (2, 4096, 14336, 8, None, True, jnp.bfloat16, TritonConfig(2, 64, 256, 1, 4, 3)),
        (1, 2048, 512, 4, 128, False, jnp.float32, TritonConfig(1, 32, 128, 1, 4, 3)),
        (5, 768, 300, 8, 128, False, jnp.bfloat16, TritonConfig(8, 16, 64, 1, 4, 3)),
    ]
    rows = []
    for i, (m, k, n, bits, gs, sym, dt, cfg) in enumerate(cases):
        kw, kx = jax.random.split(jax.random.fold_in(key, i))
        pw = make_weight(kw, k, n, bits, gs, sym, jnp.bfloat16 if i % 2 else jnp.float32)
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(dt)
        ref = reference.quantized_matmul_reference(x, pw)
        name = f"qmm M{m} K{k} N{n} {pw.format} {jnp.dtype(dt).name} {cfg.short()}"
        t0 = time.time()
        try:
            y = pallas_triton.quantized_matmul_triton(x, pw, config=cfg)
            e = rel_err(y, ref)
            tol = 1e-2 if dt == jnp.bfloat16 else 1e-5
            status = "PASS" if e <= tol else "FAIL"
        except Exception as ex:  # noqa: BLE001 - report and continue
            e, tol, status = float("nan"), 0, f"ERROR {type(ex).__name__}: {str(ex)[:300]}"
        ya = qmm.quantized_matmul(x, pw)  # auto dispatch, whatever it picks
        ea = rel_err(ya, ref)
        rows.append((name, e, status, ea, time.time() - t0))
    # W8A8
    for i, (m, k, n, cfg) in enumerate([(1, 4096, 4096, Int8Config(16, 64, 128, 4, 3)),
                                        (77, 1000, 520, Int8Config(64, 64, 64, 4, 3)),
                                        (512, 4096, 4096, Int8Config(128, 128, 64, 4, 3))]):
        ks = jax.random.split(jax.random.fold_in(key, 100 + i), 4)
        xq = jax.random.randint(ks[0], (m, k), -128, 128).astype(jnp.int8)
        wq = jax.random.randint(ks[1], (k, n), -128, 128).astype(jnp.int8)
        xs = jax.random.uniform(ks[2], (m, 1), jnp.float32, 0.001, 0.01)
        ws = jax.random.uniform(ks[3], (1, n), jnp.float32, 0.001, 0.01)
        ref = reference.int8_matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
        name = f"int8_matmul M{m} K{k} N{n} {cfg.short()}"
        t0 = time.time()
        try:
            y = pallas_triton.int8_matmul_triton(xq, xs, wq, ws, out_dtype=jnp.float32, config=cfg)
            e = rel_err(y, ref)
            status = "PASS" if e <= 1e-6 else "FAIL"
        except Exception as ex:  # noqa: BLE001
            e, status = float("nan"), f"ERROR {type(ex).__name__}: {str(ex)[:300]}"
        ea = rel_err(qmm.int8_matmul(xq, xs, wq, ws, out_dtype=jnp.float32), ref)
        rows.append((name, e, status, ea, time.time() - t0))

    print("\n| case | rel err (kernel) | result | rel err (auto dispatch) | s |")
    print("|---|---|---|---|---|")
    for name, e, status, ea, dt_s in rows:
        print(f"| {name} | {e:.2e} | {status} | {ea:.2e} | {dt_s:.1f} |")
    nfail = sum(1 for r in rows if r[2] != "PASS")
    print(f"\n{len(rows) - nfail}/{len(rows)} passed")
    return 1 if nfail else 0


if __name__ == "__main__":
    sys.exit(main())
