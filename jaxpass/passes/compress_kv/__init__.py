"""``passes.CompressKV``: KV-cache compression (int8, fp8, KIVI, Mustafar, StreamingLLM, H2O,
SnapKV, PyramidKV, ThinK) with really smaller cache buffers. See docs/kv_cache.md."""

from jaxpass.passes.compress_kv.pass_ import METHODS, CompressKV

__all__ = ["CompressKV", "METHODS"]
