"""Entry point: ``decode_attention(q, cache, lengths, *, scale, backend="auto")``.

``backend="auto"`` picks, at trace time: on a CUDA GPU, for a shape measured in
``tuned_configs.json`` (``tuning.py``), the faster of the Pallas Triton kernel (with its best
config) and XLA; for other shapes the Triton kernel (``pallas_triton.py``) with
``tuning.default_config``; where the kernel does not apply (the sparse format, odd head dims)
the XLA path, with the reason; on TPU the Mosaic TPU kernel (``pallas_mosaic_tpu.py``, dense
and int8 only, written and tested in interpret mode, never run on a TPU) with
``tuning.tpu_default_config``; elsewhere (CPU) XLA. ``select_implementation`` returns that choice and the
reason without running anything, so the CompressKV pass can put it in its report.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxpass.kernels_pallas.decode_attention import reference, tuning
from jaxpass.kernels_pallas.decode_attention.config import DecodeConfig

BACKENDS = ("auto", "xla", "reference", "triton", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class Selection:
    """What ``decode_attention`` will run: ``backend`` (not "auto"), its config, and why."""

    backend: str
    config: DecodeConfig | None
    reason: str


def select_implementation(q_shape, q_dtype, cache, *, backend="auto", config=None,
                          platform=None, interpret=False) -> Selection:
    """What ``decode_attention`` runs for these arguments, and why (nothing is run)."""
    from jaxpass.kernels_pallas.decode_attention import pallas_mosaic_tpu, pallas_triton

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("xla", "reference"):
        return Selection(backend, None, "requested")
    platform = platform or jax.default_backend()
    if backend == "mosaic_tpu" or (backend == "auto" and platform == "tpu"):
        cfg = config or tuning.tpu_default_config(cache)
        why = pallas_mosaic_tpu.check(q_shape, q_dtype, cache, cfg, interpret)
        if backend == "mosaic_tpu":
            if why:
                raise ValueError(f"backend='mosaic_tpu' cannot run this problem: {why}")
            return Selection("mosaic_tpu", cfg, "requested")
        if why:
            return Selection("xla", None, f"Mosaic TPU kernel does not apply: {why}")
        return Selection("mosaic_tpu", cfg, "TPU default config")
    groups = q_shape[1] // cache.shape[1]
    tuned = tuning.lookup(cache, groups)
    tuned_backend, tuned_cfg = tuned if tuned else (None, None)
    cfg = config or tuned_cfg or tuning.default_config(cache, groups)
    origin = "config given" if config else (
        f"tuned ({tuning.key(cache, groups)})" if tuned else "default config")
    why = pallas_triton.check(q_shape, q_dtype, cache, cfg)
    if backend == "triton":
        if why:
            raise ValueError(f"backend='triton' cannot run this problem: {why}")
        return Selection("triton", cfg, "requested")
    if platform != "gpu":
        return Selection("xla", None, f"no Pallas decode-attention kernel for {platform!r}")
    if why:
        return Selection("xla", None, f"Triton kernel does not apply: {why}")
    if config is None and tuned_backend == "xla":
        return Selection("xla", None, f"XLA measured faster ({origin})")
    return Selection("triton", cfg, origin)


def decode_attention(q, cache, lengths, *, scale, backend="auto", config: DecodeConfig | None = None,
                     interpret=False, sinks=None):
    """Single-token decode attention: ``q [b, hq, d]`` at position ``lengths - 1`` attends to the
    cache rows ``< lengths`` (``[b]`` or per head ``[b, kvh]``); returns ``[b, hq, d]`` in
    q's dtype. ``backend``: "auto" (module docstring), "xla" (dequantize in the graph),
    "reference" (f32), "triton", "mosaic_tpu" (dense/int8). ``interpret=True`` runs the Pallas kernel in the interpreter
    (CPU tests); with "auto" it selects as on a GPU. ``sinks=(k, v)``: full-precision rows
    ``[b, kvh, S, d]`` read for positions ``[0, S)`` instead of the format's rows (attention
    sinks kept intact); the Triton kernel masks those positions and merges one more partial,
    the Mosaic TPU kernel has no such input (XLA runs instead).
    """
    sel = select_implementation(q.shape, q.dtype, cache, backend=backend, config=config,
                                platform="gpu" if interpret else None, interpret=interpret)
    if sel.backend == "reference":
        return reference.reference_decode_attention(q, cache, lengths, scale=scale, sinks=sinks)
    if sel.backend == "xla" or (sel.backend == "mosaic_tpu" and sinks is not None):
        return reference.xla_decode_attention(q, cache, lengths, scale=scale, sinks=sinks)
    if sel.backend == "mosaic_tpu":
        from jaxpass.kernels_pallas.decode_attention import pallas_mosaic_tpu
        return pallas_mosaic_tpu.decode_attention_tpu(q, cache, lengths, scale=float(scale),
                                                      config=sel.config, interpret=interpret)
    from jaxpass.kernels_pallas.decode_attention import pallas_triton
    return pallas_triton.decode_attention_triton(q, cache, lengths, scale=float(scale),
                                                 config=sel.config, interpret=interpret,
                                                 sinks=sinks)
