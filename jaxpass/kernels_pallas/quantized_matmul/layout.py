"""The packed weight format of the quantized matmul, and ``pack`` / ``unpack``.

Logical meaning (what every backend computes)::

    W[k, n] = (q[k, n] - zero[k // group_size, n]) * scale[k // group_size, n]      W: [K, N]
    y = x @ W        (f32 accumulation, y in x.dtype)

with ``q`` int8 in [-128, 127] (bits=8), in [-8, 7] (bits=4, symmetric, no zero points) or in
[0, 15] (bits=4, asymmetric, with zero points). ``zero`` is 0 when absent.

Stored layout (``PackedWeight``), chosen for the decode kernels, which stream the weight once:

* ``data`` is **N-major** (each output channel's K values are contiguous), so a kernel program that
  owns a few output channels reads long contiguous runs of memory whatever N is, and can use small
  column blocks (many programs) without strided, poorly coalesced rows.

  - bits=8: ``data`` is int8 ``[N, K]``, ``data[n, k] = q[k, n]``.
  - bits=4: ``data`` is uint8 ``[N, K // 2]``, two values per byte, the even ``k`` in the low
    nibble: ``data[n, j] = c[2j, n] | (c[2j + 1, n] << 4)`` where the 4-bit code ``c`` is
    ``q + 8`` (symmetric) or ``q`` (asymmetric). This is the nibble order XLA uses for ``int4`` /
    ``uint4`` arrays, so the XLA fallback reinterprets the bytes with one ``bitcast_convert_type``.

* ``scales`` (and ``zeros``) are ``[G, N]`` with ``G = K // group_size``: one row per group, the
  same orientation as the logical ``W``; a kernel reads one contiguous row of its column block per
  group. They keep the dtype they were given (f32, bf16 or f16; zeros may also be integer).

Packing is done once, at transform time; nothing here runs per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A quantized ``[K, N]`` weight in the layout described in this module's docstring.

    Array fields (pytree leaves): ``data``, ``scales``, ``zeros`` (``None`` when symmetric).
    Static fields (pytree metadata): ``bits`` (4 or 8), ``group_size`` (an int dividing ``k``;
    per-channel quantization is stored as ``group_size == k``), ``k``, ``n``.
    """

    data: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = dataclasses.field(metadata=dict(static=True))
    group_size: int = dataclasses.field(metadata=dict(static=True))
    k: int = dataclasses.field(metadata=dict(static=True))
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        """The logical weight shape ``(K, N)``."""
        return (self.k, self.n)

    @property
    def num_groups(self) -> int:
        return self.k // self.group_size

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def per_channel(self) -> bool:
        return self.group_size == self.k

    @property
    def format(self) -> str:
        """A short name such as ``"int4_g128_sym"`` or ``"int8_pc_sym"`` (used as a tuning key)."""
        g = "pc" if self.per_channel else f"g{self.group_size}"
        return f"int{self.bits}_{g}_{'sym' if self.symmetric else 'asym'}"

    @property
    def nbytes(self) -> int:
        """Bytes a kernel must read to use this weight (data, scales and zeros)."""
        total = self.data.size * self.data.dtype.itemsize
        total += self.scales.size * self.scales.dtype.itemsize
        if self.zeros is not None:
            total += self.zeros.size * self.zeros.dtype.itemsize
        return int(total)


def _concrete(a) -> np.ndarray | None:
    """The value of ``a`` as numpy if it is concrete (not a tracer), else None."""
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
        return None


def pack(qvalues, scales, zeros=None, *, bits: int, group_size: int | None) -> PackedWeight:
    """Packs integer weights ``qvalues[K, N]`` with ``scales[G, N]`` (and ``zeros[G, N]``).

    Args:
      qvalues: integer array ``[K, N]``: int8 range for ``bits=8``; ``[-8, 7]`` for ``bits=4``
        without zeros, ``[0, 15]`` with zeros.
      scales: float array ``[G, N]`` (``[N]`` is accepted when ``G == 1``).
      zeros: optional ``[G, N]`` zero points (float or integer), same shape as ``scales``.
      bits: 4 or 8.
      group_size: group length along K; must divide K. ``None`` means per-channel (one group).

    Raises:
      ValueError naming the offending argument for a bad dtype, shape, range or group size.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    qvalues = jnp.asarray(qvalues) if not isinstance(qvalues, jax.Array) else qvalues
    if qvalues.ndim != 2:
        raise ValueError(f"qvalues must be 2-D [K, N], got shape {qvalues.shape}")
    if not jnp.issubdtype(qvalues.dtype, jnp.integer):
        raise ValueError(f"qvalues must have an integer dtype, got {qvalues.dtype}")
    k, n = qvalues.shape
    if group_size is None:
        group_size = k
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    group_size = int(group_size)
    if k % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide K={k} (qvalues shape {qvalues.shape}); "
            "use a group size that divides K, or None for per-channel")
    if bits == 4 and k % 2:
        raise ValueError(f"qvalues: K={k} must be even to pack two int4 values per byte")
    g = k // group_size

    scales = jnp.asarray(scales)
    if scales.ndim == 1 and g == 1:
        scales = scales[None, :]
    if scales.shape != (g, n):
        raise ValueError(f"scales must have shape (G, N) = {(g, n)} for group_size={group_size}, "
                         f"got {scales.shape}")
    if scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scales must be float32, bfloat16 or float16, got {scales.dtype}")
    if zeros is not None:
        zeros = jnp.asarray(zeros)
        if zeros.ndim == 1 and g == 1:
            zeros = zeros[None, :]
        if zeros.shape != (g, n):
            raise ValueError(f"zeros must have shape (G, N) = {(g, n)}, got {zeros.shape}")
        if not (zeros.dtype in _FLOAT_DTYPES or jnp.issubdtype(zeros.dtype, jnp.integer)):
            raise ValueError(f"zeros must have a float or integer dtype, got {zeros.dtype}")

    lo, hi = (-128, 127) if bits == 8 else ((0, 15) if zeros is not None else (-8, 7))
    qv = _concrete(qvalues)
    if qv is not None and qv.size and (qv.min() < lo or qv.max() > hi):
        raise ValueError(
            f"qvalues out of range for bits={bits} ({'asymmetric' if zeros is not None else 'symmetric'}):"
            f" expected [{lo}, {hi}], got [{qv.min()}, {qv.max()}]")

    q_nk = jnp.transpose(qvalues).astype(jnp.int32)  # [N, K]
    if bits == 8:
        data = q_nk.astype(jnp.int8)
    else:
        codes = (q_nk + (8 if zeros is None else 0)).astype(jnp.uint8)
        data = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return PackedWeight(data=data, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                        k=k, n=n)


def codes(pw: PackedWeight) -> jax.Array:
    """The stored integer codes as int32 ``[N, K]`` (int4: the biased nibble, in [0, 15])."""
    if pw.bits == 8:
        return pw.data.astype(jnp.int32)
    d = pw.data.astype(jnp.int32)
    return jnp.stack([d & 0xF, d >> 4], axis=-1).reshape(pw.n, pw.k)


def code_bias(pw: PackedWeight) -> int:
    """``q = code - code_bias``: 8 for symmetric int4, else 0."""
    return 8 if (pw.bits == 4 and pw.zeros is None) else 0


def unpack(pw: PackedWeight) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Inverse of :func:`pack`: ``(qvalues int8 [K, N], scales, zeros)``, exactly as given."""
    q = codes(pw) - code_bias(pw)
    return jnp.transpose(q).astype(jnp.int8), pw.scales, pw.zeros


def dequantize(pw: PackedWeight, dtype: Any = jnp.float32) -> jax.Array:
    """The logical weight ``W[K, N] = (q - zero) * scale``, computed in f32, returned in ``dtype``."""
    q, s, z = unpack(pw)
    w = q.astype(jnp.float32).reshape(pw.num_groups, pw.group_size, pw.n)
    if z is not None:
        w = w - z.astype(jnp.float32)[:, None, :]
    w = w * s.astype(jnp.float32)[:, None, :]
    return w.reshape(pw.k, pw.n).astype(dtype)
