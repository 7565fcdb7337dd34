"""Entry point: ``sparse_matmul(x, pw)`` for a packed sparse weight, dispatching on its format:
``Packed24`` (2:4, ``layout.py``), ``PackedBitmap`` (unstructured, ``bitmap_layout.py``) or
``PackedInt424`` (int4 + 2:4, ``int4_24_layout.py``).

``backend="auto"``: the format's Pallas Triton kernel on a CUDA GPU for decode shapes (M <= 64)
where its block constraints hold, XLA (decode in the graph + dense dot) otherwise;
``select_implementation`` gives the choice and the reason without running anything, for a
lowering pass's report.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax

from jaxpass.kernels_pallas.sparse_matmul import formats_reference, reference
from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24

BACKENDS = ("auto", "xla", "reference", "triton")
DECODE_MAX_M = 64


@dataclasses.dataclass(frozen=True)
class Selection:
    backend: str
    config: object | None
    reason: str


class _Kernel(NamedTuple):
    """The Triton kernel of one format: ``default_config(m, pw)``, ``check_config(x_shape,
    x_dtype, pw, cfg) -> why not | None`` and ``run(x, pw, config=, interpret=)``."""

    default_config: Callable
    check_config: Callable
    run: Callable


def _kernel_for(pw) -> _Kernel:
    from jaxpass.kernels_pallas.sparse_matmul.bitmap_layout import PackedBitmap
    from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import PackedInt424

    if isinstance(pw, Packed24):
        from jaxpass.kernels_pallas.sparse_matmul import pallas_triton as mod
        return _Kernel(lambda m, p: mod.default_config(m, p.k), mod.check_config, mod.sparse_matmul_triton)
    if isinstance(pw, PackedBitmap):
        from jaxpass.kernels_pallas.sparse_matmul import bitmap_triton as mod
        return _Kernel(mod.default_config, mod.check_config, mod.bitmap_matmul_triton)
    if isinstance(pw, PackedInt424):
        from jaxpass.kernels_pallas.sparse_matmul import int4_24_triton as mod
        return _Kernel(mod.default_config, mod.check_config, mod.int4_24_matmul_triton)
    raise ValueError("pw must be a packed sparse weight (Packed24 from layout.pack_24, PackedBitmap "
                     "from bitmap_layout.pack_bitmap or PackedInt424 from int4_24_layout.pack_int4_24), "
                     f"got {type(pw).__name__}")


def select_implementation(x_shape, x_dtype, pw, *, backend: str = "auto", config=None,
                          platform: str | None = None) -> Selection:
    kern = _kernel_for(pw)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    m = 1
    for d in x_shape[:-1]:
        m *= int(d)
    if backend in ("xla", "reference"):
        return Selection(backend, None, "requested")
    cfg = config or kern.default_config(m, pw)
    why = kern.check_config(x_shape, x_dtype, pw, cfg)
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


def sparse_matmul(x, pw, *, backend: str = "auto", config=None, interpret: bool = False):
    """``y = x @ W`` (``x[..., K]``, y in x's dtype, f32 accumulation) for a packed sparse weight."""
    kern = _kernel_for(pw)
    if x.shape[-1] != pw.k:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match the weight's K={pw.k}")
    sel = select_implementation(x.shape, x.dtype, pw, backend=backend, config=config,
                                platform="gpu" if (interpret and backend == "auto") else None)
    if sel.backend == "reference":
        if isinstance(pw, Packed24):
            return reference.sparse_matmul_reference(x, pw)
        return formats_reference.formats_matmul_reference(x, pw)
    if sel.backend == "xla":
        if isinstance(pw, Packed24):
            return reference.sparse_matmul_xla(x, pw)
        return formats_reference.formats_matmul_xla(x, pw)
    return kern.run(x, pw, config=sel.config, interpret=interpret)
