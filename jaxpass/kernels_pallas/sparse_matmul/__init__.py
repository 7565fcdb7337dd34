"""Sparse matmul: compressed weight formats and load-sparse, compute-dense decode kernels.

Formats: 2:4 (``layout.py``: values + 2-bit positions), unstructured bitmap
(``bitmap_layout.py``: bitmap + compacted values + block offsets) and int4 + 2:4
(``int4_24_layout.py``: int4 codes + 2-bit positions + group scales). ``sparse_matmul`` dispatches
on the format; see ``api.py``."""

from jaxpass.kernels_pallas.sparse_matmul.api import select_implementation, sparse_matmul
from jaxpass.kernels_pallas.sparse_matmul.bitmap_layout import PackedBitmap, pack_bitmap, unpack_bitmap
from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import (PackedInt424, pack_int4_24,
                                                                 quantize_int4_24, unpack_int4_24)
from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24, check_24, pack_24, unpack_24

__all__ = ["Packed24", "pack_24", "unpack_24", "check_24", "PackedBitmap", "pack_bitmap",
           "unpack_bitmap", "PackedInt424", "pack_int4_24", "quantize_int4_24", "unpack_int4_24",
           "sparse_matmul", "select_implementation"]
