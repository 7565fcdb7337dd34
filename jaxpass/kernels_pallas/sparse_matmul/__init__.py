"""2:4 sparse matmul: compressed format (values + 2-bit positions) and a load-sparse,
compute-dense decode kernel. See ``layout.py`` for the format and ``pallas_triton.py``."""

from jaxpass.kernels_pallas.sparse_matmul.api import select_implementation, sparse_matmul
from jaxpass.kernels_pallas.sparse_matmul.layout import Packed24, check_24, pack_24, unpack_24

__all__ = ["Packed24", "pack_24", "unpack_24", "check_24", "sparse_matmul", "select_implementation"]
