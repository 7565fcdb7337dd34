"""Weight quantization: formats, the quantized matmul op, and the Quantize pass."""

from jaxpass.passes.quantize.pass_ import Quantize
from jaxpass.passes.quantize.qarray import FORMATS, NF4_CODEBOOK, QArray, quantize, quantize_int8
from jaxpass.passes.quantize.matmul import quantized_dot_general

__all__ = ["Quantize", "QArray", "FORMATS", "NF4_CODEBOOK", "quantize", "quantize_int8",
           "quantized_dot_general"]
