"""The int4 + 2:4 format: a 2:4-sparse weight whose kept values are symmetric int4 codes with
group scales along K, and ``pack_int4_24`` / ``unpack_int4_24``.

Logical meaning: ``W[k, n] = q[k, n] * scale[k // group_size, n]`` with integer ``q`` in
[-8, 7] and at most 2 nonzero ``q`` in every group of 4 consecutive ``k`` of a column (what
``[Sparsify(pattern="2:4"), Quantize(weights="int4", symmetric=True, group_size=g)]`` makes);
``y = x @ W``.

Stored layout (``PackedInt424``), N-major, the 2:4 format (``layout.Packed24``) with its two
value arrays replaced by one byte:

* ``codes`` uint8 ``[N, K/4]``: byte ``g`` of column ``n`` holds the two kept codes of group
  ``g`` as nibbles ``(q0 + 8) | (q1 + 8) << 4`` (an unused slot holds code 8, the value 0);
* ``meta`` uint8 ``[N, K/8]``: the 2-bit positions, exactly as in ``Packed24`` (group ``c`` in
  the low nibble of byte ``c``, group ``c + K/8`` in its high nibble);
* ``scales`` ``[K / group_size, N]`` (the dtype given): one row per group, like the quantized
  matmul's ``PackedWeight``.

Bytes: ``K N / 4 + K N / 8 + (K / group_size) N * itemsize(scales)``: 0.375 bytes per weight
plus scales (0.39 with bf16 scales at group 128), against 2 for dense bf16 (5.1x fewer).
``K`` must be a multiple of 8 and of ``group_size``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.kernels_pallas.sparse_matmul.layout import check_24, pack_24, positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedInt424:
    """A 2:4-sparse symmetric-int4 ``[K, N]`` weight in the layout of this module's docstring."""

    codes: jax.Array
    meta: jax.Array
    scales: jax.Array
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))

    @property
    def format(self) -> str:
        return f"int4_g{self.group_size}+2:4"

    @property
    def dtype(self):
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                       for a in (self.codes, self.meta, self.scales)))


def check_int4_24_input(q, scales, group_size: int) -> None:
    """Raises ValueError naming the problem unless ``(q, scales)`` can be packed."""
    if getattr(q, "ndim", None) != 2:
        raise ValueError(f"pack_int4_24 takes 2-D [K, N] codes, got shape {getattr(q, 'shape', None)}")
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"pack_int4_24: codes must be integers in [-8, 7], got dtype {jnp.dtype(q.dtype).name}")
    k, n = q.shape
    if group_size < 4 or k % group_size:
        raise ValueError(f"pack_int4_24: group_size={group_size} must divide K={k} (and be >= 4)")
    if tuple(scales.shape) != (k // group_size, n):
        raise ValueError(f"pack_int4_24: scales shape {tuple(scales.shape)} is not (K / group_size, N) = "
                         f"{(k // group_size, n)}")
    if not jnp.issubdtype(scales.dtype, jnp.floating):
        raise ValueError(f"pack_int4_24: scales dtype {jnp.dtype(scales.dtype).name} is not a float")
    qn = np.asarray(q)
    if qn.size and (qn.min() < -8 or qn.max() > 7):
        raise ValueError(f"pack_int4_24: codes outside [-8, 7] (min {qn.min()}, max {qn.max()})")
    check_24(qn, 0)


def pack_int4_24(q, scales, group_size: int) -> PackedInt424:
    """Packs 2:4-sparse int4 codes ``q [K, N]`` and their ``scales [K/group_size, N]``."""
    check_int4_24_input(q, scales, group_size)
    k, n = q.shape
    p = pack_24(jnp.asarray(q, jnp.int8))
    c0 = (p.v0.astype(jnp.int32) + 8).astype(jnp.uint8)
    c1 = (p.v1.astype(jnp.int32) + 8).astype(jnp.uint8)
    return PackedInt424(c0 | (c1 << 4), p.meta, jnp.asarray(scales), k, n, group_size)


def quantize_int4_24(w, group_size: int, scale_dtype=None) -> PackedInt424:
    """Round-to-nearest symmetric int4 (codes in [-7, 7], ``scale = max |w| / 7`` per group and
    column) of a 2:4-sparse float ``w [K, N]``, packed. Zeros stay zeros, so the codes stay 2:4."""
    k, n = w.shape
    if group_size < 4 or k % group_size:
        raise ValueError(f"quantize_int4_24: group_size={group_size} must divide K={k}")
    wf = jnp.asarray(w, jnp.float32).reshape(k // group_size, group_size, n)
    scale = jnp.max(jnp.abs(wf), axis=1) / 7.0
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(wf / safe[:, None, :]), -7, 7).astype(jnp.int8).reshape(k, n)
    return pack_int4_24(q, scale.astype(scale_dtype or jnp.dtype(w.dtype)), group_size)


def int4_24_codes(pw: PackedInt424):
    """The integer codes ``q`` ``[K, N]`` (int32, traceable)."""
    i0, i1 = positions(pw)
    c = pw.codes.astype(jnp.int32)
    q0, q1 = (c & 0xF) - 8, (c >> 4) - 8
    j = jnp.arange(4)
    dense = jnp.where(i0[..., None] == j, q0[..., None], 0) + jnp.where(i1[..., None] == j, q1[..., None], 0)
    return dense.reshape(pw.n, pw.k).T


def unpack_int4_24(pw: PackedInt424, dtype=None):
    """The dense ``[K, N]`` weight ``q * scale`` (traceable), computed in f32 and returned in
    ``dtype`` (default: the scales' dtype; the reference asks for f32, where it is exact)."""
    q = int4_24_codes(pw).astype(jnp.float32)
    s = jnp.repeat(pw.scales.astype(jnp.float32), pw.group_size, axis=0)
    return (q * s).astype(dtype or pw.scales.dtype)
