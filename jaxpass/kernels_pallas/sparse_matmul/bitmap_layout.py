"""The unstructured bitmap format of the sparse matmul, and ``pack_bitmap`` / ``unpack_bitmap``.

Logical meaning: any ``[K, N]`` weight ``W`` (zeros anywhere); ``y = x @ W``. Worth storing this
way when most of ``W`` is zero (unstructured magnitude / Wanda / SparseGPT pruning at 60-80%).

Stored layout (``PackedBitmap``), N-major like the other formats, Flash-LLM-like (a bitmap says
where the nonzeros are, the nonzeros themselves are stored compacted), for decode kernels that
stream the weight once:

* ``words`` uint32 ``[N, K/32]``: bit ``i`` of word ``j`` of column ``n`` is set iff
  ``W[32 j + i, n] != 0``;
* ``values`` 1-D (the weight's dtype): all nonzeros, column after column, each column's in
  ``k`` order, then at most 7 zeros (the length rounded up to a multiple of 8). One flat array
  rather than a ``[N, P]`` one padded to the fullest column: on SmolLM2 at 70% magnitude
  sparsity the per-column counts are so uneven that such padding was 48% of the stored bytes;
* ``offsets`` int32 ``[N, K / (32 * block_words)]``: the index in ``values`` of the first
  nonzero of block ``b`` (rows ``[32 * block_words * b, 32 * block_words * (b + 1))``) of
  column ``n``. A kernel step that owns one block finds its values from this offset plus the
  in-block prefix of the word popcounts, and the in-word rank of bit ``i`` is
  ``popcount(word & ((1 << i) - 1))``: no global prefix sum at run time.

Bytes per weight for bf16 at sparsity ``s``: ``1/8`` (bitmap) ``+ 2 (1 - s)`` (values)
``+ 4 / (32 * block_words)`` (offsets): at 70% and ``block_words=16``,
``0.125 + 0.6 + 0.008 = 0.733`` against 2 dense (2.7x fewer). The value array's size depends on
the data, so packing runs on the host, once. ``K`` must be a
multiple of 32; ``block_words`` a power of two dividing ``K / 32`` (the default is the largest
such one <= 16).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
VALUE_ALIGN = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedBitmap:
    """An unstructured-sparse ``[K, N]`` weight in the layout of this module's docstring.

    Static fields: ``k``, ``n``, ``block_words`` (bitmap words per offset block) and ``nnz`` (the
    number of nonzeros; ``values`` holds them and at most 7 zeros of padding).
    """

    words: jax.Array
    values: jax.Array
    offsets: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    block_words: int = dataclasses.field(metadata=dict(static=True))
    nnz: int = dataclasses.field(metadata=dict(static=True))

    @property
    def format(self) -> str:
        return f"bitmap-{jnp.dtype(self.values.dtype).name}"

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Stored bytes, padding of ``values`` included."""
        return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                       for a in (self.words, self.values, self.offsets)))

    @property
    def padding_bytes(self) -> int:
        """Bytes of ``values`` that hold padding rather than nonzeros."""
        return (int(self.values.shape[0]) - self.nnz) * jnp.dtype(self.values.dtype).itemsize

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / float(self.k * self.n)


def default_block_words(k: int) -> int:
    """The largest power of two <= 16 dividing ``K / 32`` (one offset per 512 rows at most)."""
    kw = k // 32
    bw = 16
    while bw > 1 and kw % bw:
        bw //= 2
    return bw


def check_bitmap_input(w, block_words: int | None = None) -> int:
    """Raises ValueError naming the problem unless ``w`` can be packed; returns ``block_words``."""
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"pack_bitmap takes a 2-D [K, N] weight, got shape {getattr(w, 'shape', None)}")
    if jnp.dtype(w.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"pack_bitmap: weight dtype {jnp.dtype(w.dtype).name} is not float32, "
                         "bfloat16 or float16")
    k = int(w.shape[0])
    if k % 32:
        raise ValueError(f"pack_bitmap needs K divisible by 32 (one 32-bit bitmap word per 32 "
                         f"rows), got K={k}")
    bw = default_block_words(k) if block_words is None else int(block_words)
    if bw < 1 or bw & (bw - 1) or (k // 32) % bw:
        raise ValueError(f"block_words={bw} must be a power of two dividing K/32={k // 32}")
    return bw


def pack_bitmap(w, block_words: int | None = None) -> PackedBitmap:
    """Packs ``w [K, N]`` (zeros in place) into the bitmap format. Runs once, on the host: the
    values' static size ``P`` depends on the data, so this is not traceable."""
    bw = check_bitmap_input(w, block_words)
    dtype = jnp.dtype(w.dtype)
    wt = np.asarray(w).T                                            # [N, K]
    n, k = wt.shape
    nz = wt != 0
    bits = nz.reshape(n, k // 32, 32).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    words = np.bitwise_or.reduce(bits, axis=-1).astype(np.uint32)   # [N, K/32]
    nnz = int(nz.sum())
    size = max(VALUE_ALIGN, -(-nnz // VALUE_ALIGN) * VALUE_ALIGN)
    values = np.zeros((size,), wt.dtype)
    values[:nnz] = wt[nz]                                           # row-major: column by column
    col_start = np.cumsum(nz.sum(1)) - nz.sum(1)
    per_block = nz.reshape(n, k // (32 * bw), 32 * bw).sum(-1)
    offsets = (col_start[:, None] + np.cumsum(per_block, axis=1) - per_block).astype(np.int32)
    if nnz >= 2 ** 31:
        raise ValueError(f"pack_bitmap: {nnz} nonzeros do not fit int32 offsets")
    return PackedBitmap(jnp.asarray(words), jnp.asarray(values, dtype), jnp.asarray(offsets), k, n, bw, nnz)


def bit_planes(pb: PackedBitmap):
    """int32 ``[N, K]``: 1 where the weight is nonzero (traceable)."""
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (pb.words[..., None] >> shifts) & jnp.uint32(1)          # [N, K/32, 32]
    return bits.reshape(pb.n, pb.k).astype(jnp.int32)


def unpack_bitmap(pb: PackedBitmap):
    """The dense ``[K, N]`` weight (traceable: the XLA path decodes it in the graph). Uses a
    prefix sum over all bits (column after column), not ``offsets`` (an independent decode)."""
    bits = bit_planes(pb).reshape(-1)
    rank = jnp.cumsum(bits) - 1                                      # index of each nonzero
    vals = jnp.take(pb.values, jnp.clip(rank, 0, pb.values.shape[0] - 1))
    return jnp.where(bits == 1, vals, jnp.zeros((), pb.values.dtype)).reshape(pb.n, pb.k).T
