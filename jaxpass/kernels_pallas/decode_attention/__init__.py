"""Decode attention (one query token per row) over dense, int8, KIVI 2/4-bit and sparse KV caches.

Public entry points::

    cache = formats.from_dense("kivi", k, v, lengths=lengths, bits=4)   # or formats.init + append
    o = decode_attention(q, cache, lengths, scale=d ** -0.5)          # q [b, hq, d] -> [b, hq, d]
    o = reference_decode_attention(q, cache, lengths, scale=...)      # plain JAX, f32

See ``formats.py`` for the cache layouts and docs/decode_attention.md for backends and figures.
"""

from jaxpass.kernels_pallas.decode_attention import formats
from jaxpass.kernels_pallas.decode_attention.formats import (
    KINDS,
    DenseKV,
    Int8KV,
    KiviKV,
    SparseKV,
    from_dense,
    init,
)
from jaxpass.kernels_pallas.decode_attention.config import DecodeConfig
from jaxpass.kernels_pallas.decode_attention.reference import (
    reference_decode_attention,
    xla_decode_attention,
)
from jaxpass.kernels_pallas.decode_attention.api import decode_attention, select_implementation

__all__ = [
    "formats", "KINDS", "DenseKV", "Int8KV", "KiviKV", "SparseKV", "from_dense", "init",
    "DecodeConfig", "decode_attention", "reference_decode_attention", "xla_decode_attention",
    "select_implementation",
]
