"""Entry points: ``quantized_matmul`` (weight-only) and ``int8_matmul`` (W8A8).

``backend="auto"`` picks, at trace time:

* on a CUDA GPU: the tuned choice for this (format, dtype, M bucket, K, N) from
  ``tuned_configs.json`` (measured against XLA by ``scripts/bench_matmul.py``); with no entry, the
  word GEMV (``pallas_triton_gemv``) for a single row of 16-bit x, the Pallas Triton kernel for
  other decode shapes (M <= 64) and XLA (dequantize + dot) for larger M, where the weight is
  re-read by few programs and XLA's GEMMs win;
* on TPU: the Mosaic TPU kernel where its block constraints hold, else XLA;
* elsewhere (CPU): XLA.

``select_implementation`` returns the choice and the reason without running anything, so a
lowering pass can record it in its report. Nothing falls back silently: the reason says why.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxpass.kernels_pallas.quantized_matmul import pallas_triton_gemv, reference, tuning
from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig, Int8Config, TritonConfig
from jaxpass.kernels_pallas.quantized_matmul.layout import PackedWeight

BACKENDS = ("auto", "xla", "reference", "triton", "triton_gemv", "mosaic_tpu")
DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Selection:
    """What ``quantized_matmul`` will run: ``backend`` in BACKENDS (not "auto"), its config, why."""

    backend: str
    config: object | None
    reason: str


def _platform() -> str:
    return jax.default_backend()


def select_implementation(x_shape, x_dtype, pw: PackedWeight, *, backend: str = "auto",
                          config=None, platform: str | None = None) -> Selection:
    """Chooses the implementation for ``x[x_shape] @ pw`` (see module docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x_dtype = jnp.dtype(x_dtype)
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    if backend in ("xla", "reference"):
        return Selection(backend, None, "requested")
    if backend in ("triton", "triton_gemv"):
        cfg = config or _tuned_or_default(pw, x_dtype, m, gemv_ok=backend == "triton_gemv")[0]
        why = check_config(x_shape, x_dtype, pw, cfg)
        if why:
            raise ValueError(f"backend={backend!r} cannot run this problem: {why}")
        return Selection(backend_of(cfg), cfg, "requested")
    if backend == "mosaic_tpu":
        from jaxpass.kernels_pallas.quantized_matmul import pallas_mosaic_tpu
        why = pallas_mosaic_tpu.check(x_shape, x_dtype, pw, config)
        if why:
            raise ValueError(f"backend='mosaic_tpu' cannot run this problem: {why}")
        return Selection("mosaic_tpu", config, "requested")

    platform = platform or _platform()
    if platform == "gpu":
        cfg, tuned_backend, origin = _tuned_or_default(pw, x_dtype, m)
        if config is not None:
            cfg, tuned_backend, origin = config, backend_of(config), "config given"
        if tuned_backend == "xla":
            return Selection("xla", None, f"XLA measured faster ({origin})")
        if tuned_backend is None and m > DECODE_MAX_M:
            return Selection("xla", None, f"M={m} > {DECODE_MAX_M} and no tuned entry: XLA GEMM")
        why = check_config(x_shape, x_dtype, pw, cfg)
        if why and isinstance(cfg, GemvConfig):  # e.g. f32 x: the byte kernel's default instead
            cfg = tuning.default_config(m, pw.k, pw.n, pw.bits)
            why = check_config(x_shape, x_dtype, pw, cfg)
        if why:
            return Selection("xla", None, f"Triton kernel does not apply: {why}")
        return Selection(backend_of(cfg), cfg, origin)
    if platform == "tpu":
        from jaxpass.kernels_pallas.quantized_matmul import pallas_mosaic_tpu
        why = pallas_mosaic_tpu.check(x_shape, x_dtype, pw, config)
        if why:
            return Selection("xla", None, f"Mosaic TPU kernel does not apply: {why}")
        return Selection("mosaic_tpu", config, "TPU")
    return Selection("xla", None, f"no Pallas kernel for platform {platform!r}")


def backend_of(cfg) -> str:
    """The backend name a kernel config belongs to ("triton_gemv" or "triton")."""
    return "triton_gemv" if isinstance(cfg, GemvConfig) else "triton"


def check_config(x_shape, x_dtype, pw: PackedWeight, cfg) -> str | None:
    """Why ``cfg`` (TritonConfig or GemvConfig) cannot run ``x[x_shape] @ pw``, or None."""
    from jaxpass.kernels_pallas.quantized_matmul import pallas_triton
    if isinstance(cfg, GemvConfig):
        return pallas_triton_gemv.check_config(x_shape, x_dtype, pw, cfg)
    return pallas_triton.check_config(x_shape, x_dtype, pw, cfg)


def _tuned_or_default(pw: PackedWeight, x_dtype, m: int, gemv_ok: bool = True):
    entry = tuning.lookup(pw.format, x_dtype, m, pw.k, pw.n)
    if entry is not None:
        cfg = None
        if entry.get("config"):
            cls = GemvConfig if entry["backend"] == "triton_gemv" else TritonConfig
            cfg = cls.from_dict(entry["config"])
        if cfg is None:
            cfg = tuning.default_config(m, pw.k, pw.n, pw.bits)
        return cfg, entry["backend"], f"tuned ({tuning.key(pw.format, x_dtype, m, pw.k, pw.n)})"
    if gemv_ok and m <= tuning.GEMV_MAX_M and jnp.dtype(x_dtype).itemsize == 2:
        return tuning.default_gemv_config(pw.n), None, "default config"
    return tuning.default_config(m, pw.k, pw.n, pw.bits), None, "default config"


def quantized_matmul(x: jax.Array, w: PackedWeight, *, backend: str = "auto", config=None,
                     interpret: bool = False) -> jax.Array:
    """``y = x @ W`` for a packed quantized weight ``W[K, N]``; ``x[..., K]`` bf16/f16/f32.

    The result has x's dtype and is accumulated in f32. ``backend``: "auto" (see module
    docstring), "xla" (dequantize + dot), "reference" (f32 HIGHEST-precision reference),
    "triton" (Pallas Triton kernel), "mosaic_tpu". ``config``: a ``TritonConfig`` (triton) or a
    dict of block sizes (mosaic_tpu). ``interpret=True`` runs Pallas kernels in the interpreter
    (CPU tests).
    """
    if not isinstance(w, PackedWeight):
        raise ValueError(f"w must be a PackedWeight (see layout.pack), got {type(w).__name__}")
    if x.shape[-1] != w.k:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's K={w.k}")
    if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    sel = select_implementation(x.shape, x.dtype, w, backend=backend, config=config,
                                platform="gpu" if (interpret and backend == "auto") else None)
    if sel.backend == "reference":
        return reference.quantized_matmul_reference(x, w)
    if sel.backend == "xla":
        return reference.quantized_matmul_xla(x, w)
    if sel.backend == "triton":
        from jaxpass.kernels_pallas.quantized_matmul import pallas_triton
        return pallas_triton.quantized_matmul_triton(x, w, config=sel.config, interpret=interpret)
    if sel.backend == "triton_gemv":
        return pallas_triton_gemv.quantized_matmul_gemv(x, w, config=sel.config,
                                                        interpret=interpret)
    from jaxpass.kernels_pallas.quantized_matmul import pallas_mosaic_tpu
    cfg = tuple(sorted(dict(sel.config).items())) if sel.config else None  # hashable (static)
    return pallas_mosaic_tpu.quantized_matmul_tpu(x, w, config=cfg, interpret=interpret)


def int8_matmul(xq: jax.Array, x_scale: jax.Array, wq: jax.Array, w_scale: jax.Array, *,
                out_dtype=jnp.bfloat16, backend: str = "auto", config: Int8Config | None = None,
                interpret: bool = False) -> jax.Array:
    """W8A8: ``(xq[M, K] @ wq[K, N])`` in int32, times ``x_scale[M, 1] * w_scale[1, N]``.

    ``backend``: "auto" (the Triton kernel on GPU, XLA's int8 GEMM elsewhere), "xla", "reference",
    "triton".
    """
    reference._check_int8_args(xq, x_scale, wq, w_scale)
    if backend not in ("auto", "xla", "reference", "triton"):
        raise ValueError(f"backend must be auto, xla, reference or triton, got {backend!r}")
    if backend == "auto":
        backend = "triton" if (interpret or _platform() == "gpu") else "xla"
    if backend == "reference":
        return reference.int8_matmul_reference(xq, x_scale, wq, w_scale, out_dtype=out_dtype)
    if backend == "xla":
        return reference.int8_matmul_xla(xq, x_scale, wq, w_scale, out_dtype=out_dtype)
    from jaxpass.kernels_pallas.quantized_matmul import pallas_triton
    return pallas_triton.int8_matmul_triton(xq, x_scale, wq, w_scale, out_dtype=out_dtype,
                                            config=config or Int8Config(), interpret=interpret)
