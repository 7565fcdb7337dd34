"""Entry point: ``sparse_matmul(x, pw)`` for a 2:4 ``Packed24`` weight.

``backend="auto"``: the Pallas Triton kernel on a CUDA GPU for decode shapes (M <= 64) where its
block constraints hold, XLA (decode in the graph + dense dot) otherwise; ``select_implementation``
gives the choice and the reason without running anything, for a lowering pass's report.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxpass.kernels_pallas.sparse_matmul import reference
from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24

BACKENDS = ("auto", "xla", "reference", "triton")
DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Selection:
    backend: str
    config: object | None
    reason: str


def select_implementation(x_shape, x_dtype, pw: Packed24, *, backend: str = "auto", config=None,
                          platform: str | None = None) -> Selection:
    from jaxpass.kernels_pallas.sparse_matmul import pallas_triton

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    if backend in ("xla", "reference"):
        return Selection(backend, None, "requested")
    cfg = config or pallas_triton.default_config(m, pw.k)
    why = pallas_triton.check_config(x_shape, x_dtype, pw, cfg)
    if backend == "triton":
        if why:
            raise ValueError(f"backend='triton' cannot run this problem: {why}")
        return Selection("triton", cfg, "requested")
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return Selection("xla", None, f"no Pallas sparse kernel for platform {platform!r}")
    if m > DECODE_MAX_M:
        return Selection("xla", None, f"M={m} > {DECODE_MAX_M}: XLA GEMM on the decoded weight")
    if why:
        return Selection("xla", None, f"Triton kernel does not apply: {why}")
    return Selection("triton", cfg, "decode shape")


def sparse_matmul(x, pw: Packed24, *, backend: str = "auto", config=None, interpret: bool = False):
    """``y = x @ W`` (``x[..., K]``, y in x's dtype, f32 accumulation) for a 2:4 weight."""
    if not isinstance(pw, Packed24):
        raise ValueError(f"pw must be a Packed24 (see layout.pack_24), got {type(pw).__name__}")
    if x.shape[-1] != pw.k:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's K={pw.k}")
    sel = select_implementation(x.shape, x.dtype, pw, backend=backend, config=config,
                                platform="gpu" if (interpret and backend == "auto") else None)
    if sel.backend == "reference":
        return reference.sparse_matmul_reference(x, pw)
    if sel.backend == "xla":
        return reference.sparse_matmul_xla(x, pw)
    from jaxpass.kernels_pallas.sparse_matmul import pallas_triton
    return pallas_triton.sparse_matmul_triton(x, pw, config=sel.config, interpret=interpret)
