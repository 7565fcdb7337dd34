"""Weight-only quantized matmul (W4A16 / W8A16) and W8A8 int8 matmul.

Public entry points::

    pw = pack(qvalues, scales, zeros=None, bits=4, group_size=128)   # once, at transform time
    y = quantized_matmul(x, pw)                                      # y = x @ W in x.dtype
    y = int8_matmul(xq, x_scale, wq, w_scale)                        # W8A8

See ``layout.py`` for the packed format and docs/kernels.md for the backends.
"""

from jaxpass.kernels_pallas.quantized_matmul.layout import (
    PackedWeight,
    dequantize,
    pack,
    unpack,
)
from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig, TritonConfig
from jaxpass.kernels_pallas.quantized_matmul.api import (
    int8_matmul,
    quantized_matmul,
    select_implementation,
)

__all__ = [
    "PackedWeight", "pack", "unpack", "dequantize", "TritonConfig", "GemvConfig",
    "quantized_matmul", "int8_matmul", "select_implementation",
]
