"""QArray: a quantized weight as a structured value, and the quantizers that make one.

Layout
------
- ``qvalue`` holds the codes in the parameter's own axis order:
  ``int8``: int8 codes in [-127, 127] (symmetric) or uint8 in [0, 255] (asymmetric);
  ``int4`` / ``nf4``: uint8, **two codes per byte** along ``packed_axis`` (stored as a negative
  axis, so it stays right when a scan slices leading axes): the element at even index ``2i``
  is the low nibble of byte ``i``, index ``2i+1`` the high nibble. Symmetric int4 codes are
  4-bit two's complement in [-7, 7]; asymmetric ones unsigned in [0, 15]; nf4 codes index the
  QLoRA NormalFloat-4 codebook. The packed axis is the weight's contracting axis, so it must be
  even (a clear error otherwise);
  ``fp8``: float8_e4m3fn values;
  ``int3``: 3-bit codes ([-3, 3] symmetric, [0, 7] asymmetric) stored like int4, two per byte
  (a 4-bit container: the accuracy of 3 bits, the memory of 4);
  ``int2``: 2-bit codes ([-1, 1] symmetric, i.e. ternary; [0, 3] asymmetric), **four per byte**
  along ``packed_axis`` (element ``4i + j`` in bits ``2j..2j+1`` of byte ``i``).
- ``scale`` (float32) has the same rank as the logical weight. Along each axis its size is
  either the full size (one scale per index), 1 (shared over the axis: the matmul's contracting
  axes for per-channel quantization), or ``size / group_size`` (one scale per contiguous group
  along the contracting axis). A stacked ``[L, K, N]`` weight gets ``[L, 1, N]`` (per channel) or
  ``[L, K/g, N]`` (per group) scales: one set per layer.
- ``zero`` (asymmetric only) has the scale's shape: the dense value is ``(code - zero) * scale``.
  It is a float (``-min / scale``), not an integer: min-max quantization on the grid
  ``min + k * scale``, like llama.cpp's Q4_1, reproduces 4-bit data with that structure exactly.
- ``outlier_idx`` / ``outlier_val`` (optional, dense-and-sparse weights in the spirit of SpQR and
  SqueezeLLM): the ``r`` largest-magnitude weights of each output channel, kept exactly (float16)
  beside the quantized dense part, which is quantized without them (so its scales are not
  stretched by them). Both have the weight's rank with the contracting axis of size ``r``;
  ``outlier_idx`` (int16/int32) holds each outlier's index along that axis. The dense value is the
  dequantized codes with the outliers written over them.
- ``act_scale`` (optional, W8A8 with static activation scales): the quantization step of the
  matmul's *input*, calibrated once (``max |x| / 127`` over the calibration data, per layer for
  stacked weights), shaped like the weight with every axis of size 1 except a stacked weight's
  layer axis. Without it, activations are quantized dynamically, one scale per token.

Because scale and zero keep every axis, layout-only equations (transpose, reshape, slicing,
scan slicing) apply to them as to the codes, so a quantized weight stays quantized through the
layout ops that models put between a parameter and its matmul. Group sizes and reduced axes are
derived from shapes, never stored, so no metadata goes stale.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core.values import StructuredValue, reshape_groups

# QLoRA's NormalFloat-4 codebook (Dettmers et al. 2023, appendix E).
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

FP8_E4M3_MAX = 448.0
FORMATS = ("int8", "int4", "nf4", "fp8", "int3", "int2")
#: bits of information per code, and bits of storage per code when packed
FORMAT_BITS = {"int8": 8, "fp8": 8, "int4": 4, "nf4": 4, "int3": 3, "int2": 2}
STORAGE_BITS = {"int4": 4, "nf4": 4, "int3": 4, "int2": 2}
SIGNED_PACKED = ("int4", "int3", "int2")   # two's complement codes when symmetric


@dataclasses.dataclass
class QArray(StructuredValue):
    qvalue: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    dtype: object = jnp.float32          # logical dtype of the dense weight
    fmt: str = "int8"                    # one of FORMATS
    packed_axis: int | None = None       # negative axis along which two codes share a byte
    source: str = ""                     # parameter path, for reports
    in_scale: jax.Array | None = None    # AWQ: per input channel, applied to the activation
    outlier_idx: jax.Array | None = None  # dense-and-sparse: indices along the contracting axis
    outlier_val: jax.Array | None = None  # ... and their exact values (float16)
    act_scale: jax.Array | None = None    # static activation step (W8A8 from calibration), all-ones shape

    # -- description ---------------------------------------------------------------------------
    @property
    def format_name(self) -> str:
        return self.fmt

    @property
    def bits(self) -> int:
        return FORMAT_BITS[self.fmt]

    @property
    def codes_per_byte(self) -> int:
        return 8 // STORAGE_BITS.get(self.fmt, 8)

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self):
        shape = list(self.qvalue.shape)
        if self.packed_axis is not None:
            shape[self.packed_axis] *= self.codes_per_byte
        return tuple(shape)

    @property
    def ndim(self):
        return len(self.qvalue.shape)

    def describe(self) -> str:
        store = f"{jnp.dtype(self.qvalue.dtype).name}{list(self.qvalue.shape)}"
        if self.packed_axis is not None:
            store += (f" ({self.fmt}, {self.codes_per_byte} per byte along axis "
                      f"{self.packed_axis % self.ndim})")
        text = f"{store} + f32{list(self.scale.shape)} scale"
        text += " + zero point" if self.zero is not None else ""
        if self.outlier_idx is not None:
            text += f" + {self.outlier_idx.shape[self.outlier_axis()]} outliers per channel"
        return text + (f" + f32{list(self.in_scale.shape)} input scale" if self.in_scale is not None else "")

    def outlier_axis(self) -> int:
        """The axis ``outlier_idx`` indexes: where its size differs from the weight's."""
        diff = [d for d, (n, r) in enumerate(zip(self.shape, self.outlier_idx.shape)) if n != r]
        return diff[0] if diff else self.ndim - 2

    def per_channel_axes(self) -> tuple[int, ...]:
        """Axes the scale is shared over entirely (size 1 where the weight is larger)."""
        return tuple(d for d, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if s == 1 and n != 1)

    def grouped_axes(self) -> tuple[int, ...]:
        return tuple(d for d, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if 1 < s < n)

    def coarse_axes(self) -> tuple[int, ...]:
        """Axes along which the scale is not one-per-index."""
        return tuple(d for d, (n, s) in enumerate(zip(self.shape, self.scale.shape)) if s != n)

    # -- values ----------------------------------------------------------------------------------
    def codes(self) -> jax.Array:
        """Unpacked codes in the logical shape (int8 for int formats, indices for nf4)."""
        if self.packed_axis is None:
            return self.qvalue
        return unpack_codes(self.qvalue, self.packed_axis, STORAGE_BITS[self.fmt],
                            signed=self.fmt in SIGNED_PACKED and self.zero is None)

    def code_values(self) -> jax.Array:
        """The codes as float32 numbers before scaling (codebook lookup for nf4)."""
        c = self.codes()
        if self.fmt == "nf4":
            return jnp.asarray(NF4_CODEBOOK)[c.astype(jnp.int32)]
        c = c.astype(jnp.float32)
        return c if self.zero is None else c - expand(self.zero, self.shape)

    def materialize(self):
        w = self.code_values() * expand(self.scale, self.shape)
        if self.in_scale is not None:
            w = w * self.in_scale
        if self.outlier_idx is not None:
            w = put_along_axis(w, self.outlier_idx, self.outlier_val.astype(jnp.float32),
                               self.outlier_axis())
        return w.astype(self.dtype)

    def unpacked(self) -> "QArray":
        if self.packed_axis is None:
            return self
        return dataclasses.replace(self, qvalue=self.codes(), packed_axis=None)

    # -- layout ----------------------------------------------------------------------------------
    def _with(self, qvalue, scale, zero, dtype=None) -> "QArray":
        return dataclasses.replace(self, qvalue=qvalue, scale=scale, zero=zero,
                                   dtype=self.dtype if dtype is None else dtype)

    def _side_arrays(self) -> dict:
        """Keepdims arrays that follow the codes through layout ops (by field name)."""
        return {f: getattr(self, f) for f in ("scale", "zero", "in_scale", "outlier_idx", "outlier_val",
                                              "act_scale") if getattr(self, f) is not None}

    def apply_layout(self, name, params, *index_operands):
        if name in ("copy", "copy_p"):
            return self
        if name == "convert_element_type":
            new = jnp.dtype(params["new_dtype"])
            return dataclasses.replace(self, dtype=new) if jnp.issubdtype(new, jnp.floating) else None
        if self.packed_axis is not None:
            if name == "transpose":  # the packed axis just moves
                perm = tuple(params["permutation"])
                moved = perm.index(self.packed_axis % self.ndim) - self.ndim
                side = {f: jnp.transpose(a, perm) for f, a in self._side_arrays().items()}
                return dataclasses.replace(self, qvalue=jnp.transpose(self.qvalue, perm),
                                           packed_axis=moved, **side)
            # Otherwise packing is a storage detail: the layout op sees the codes.
            return self.unpacked().apply_layout(name, params, *index_operands)
        if self.outlier_idx is not None and name == "reshape":
            return None  # outlier indices refer to one axis; a reshape may merge it
        q = self.qvalue
        new_q = _layout_codes(name, params, q, index_operands)
        if new_q is None:
            return None
        side = {}
        for field, a in self._side_arrays().items():
            moved = _layout_side(name, params, q.shape, a, index_operands)
            if moved is None:
                return None
            side[field] = moved
        return dataclasses.replace(self, qvalue=new_q, **side)


def _layout_codes(name, params, q, index_operands):
    if name == "transpose":
        return jnp.transpose(q, tuple(params["permutation"]))
    if name == "squeeze":
        return lax.squeeze(q, tuple(params["dimensions"]))
    if name == "broadcast_in_dim":
        return lax.broadcast_in_dim(q, tuple(params["shape"]), tuple(params["broadcast_dimensions"]))
    if name == "reshape":
        return None if params.get("dimensions") is not None else q.reshape(tuple(params["new_sizes"]))
    if name == "slice":
        return lax.slice(q, params["start_indices"], params["limit_indices"], params.get("strides"))
    if name == "dynamic_slice":
        return lax.dynamic_slice(q, index_operands, tuple(params["slice_sizes"]))
    return None


def _layout_side(name, params, q_shape, a, index_operands):
    """A keepdims side array (scale, zero point, input scale) after a layout op on the codes.

    Along each axis the side array is full-size, size 1 (shared) or grouped; a slice that cuts
    into a shared or grouped axis is refused (None), everything else follows the codes."""
    nd = len(q_shape)
    if name == "transpose":
        return jnp.transpose(a, tuple(params["permutation"]))
    if name == "squeeze":
        return lax.squeeze(a, tuple(params["dimensions"]))
    if name == "broadcast_in_dim":
        shape, bdims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
        if any(a.shape[k] not in (1, q_shape[k]) or (q_shape[k] != shape[d] and a.shape[k] != 1)
               for k, d in enumerate(bdims)):
            return None
        a_shape = [1] * len(shape)
        for k, d in enumerate(bdims):
            a_shape[d] = a.shape[k] if q_shape[k] == shape[d] else 1
        return lax.broadcast_in_dim(a, tuple(a_shape), bdims)
    if name == "reshape":
        a_shape = _reshaped_scale_shape(q_shape, a.shape, tuple(params["new_sizes"]))
        return None if a_shape is None else a.reshape(a_shape)
    full = [a.shape[d] == q_shape[d] for d in range(nd)]
    if name == "slice":
        start, limit = params["start_indices"], params["limit_indices"]
        strides = params.get("strides") or (1,) * nd
        if any(not f and (start[d], limit[d]) != (0, q_shape[d]) and a.shape[d] != 1
               for d, f in enumerate(full)):
            return None
        st = [start[d] if f else 0 for d, f in enumerate(full)]
        li = [limit[d] if f else a.shape[d] for d, f in enumerate(full)]
        sd = [strides[d] if f else 1 for d, f in enumerate(full)]
        return lax.slice(a, st, li, sd)
    if name == "dynamic_slice":
        sizes = tuple(params["slice_sizes"])
        if any(not f and a.shape[d] != 1 and sizes[d] != q_shape[d] for d, f in enumerate(full)):
            return None
        zero_i = jnp.zeros((), jnp.int32)
        idx = [index_operands[d] if f else zero_i for d, f in enumerate(full)]
        sz = [sizes[d] if f else a.shape[d] for d, f in enumerate(full)]
        return lax.dynamic_slice(a, idx, sz)
    return None


jax.tree_util.register_dataclass(QArray, data_fields=["qvalue", "scale", "zero", "in_scale",
                                                      "outlier_idx", "outlier_val", "act_scale"],
                                 meta_fields=["dtype", "fmt", "packed_axis", "source"])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def put_along_axis(w, idx, vals, axis: int):
    """``w`` with ``vals`` written at indices ``idx`` along ``axis`` (idx/vals: w's rank, any
    size along ``axis``, broadcastable elsewhere)."""
    idx = jnp.broadcast_to(idx, w.shape[:axis] + idx.shape[axis:axis + 1] + w.shape[axis + 1:])
    grids = list(jnp.indices(idx.shape, sparse=True))
    grids[axis] = idx.astype(jnp.int32)
    return w.at[tuple(grids)].set(jnp.broadcast_to(vals, idx.shape).astype(w.dtype))


def split_outliers(w, axis: int, count: int):
    """The ``count`` largest-magnitude entries of ``w`` along ``axis`` (per every other index):
    ``(w with them zeroed, indices, values)``."""
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    _, top = jax.lax.top_k(moved, count)                       # [..., count]
    idx = jnp.moveaxis(top, -1, axis)
    vals = jnp.take_along_axis(w, idx, axis=axis)
    itype = jnp.int16 if w.shape[axis] <= np.iinfo(np.int16).max else jnp.int32
    return put_along_axis(w, idx, jnp.zeros_like(vals), axis), idx.astype(itype), vals


def expand(scale, shape):
    """Broadcasts a keepdims (possibly grouped) scale to ``shape``: along an axis where the scale
    has ``m`` entries for ``n`` elements, each entry covers ``n / m`` contiguous elements."""
    s = scale
    for d, (n, m) in enumerate(zip(shape, scale.shape)):
        if 1 < m < n:
            s = jnp.repeat(s, n // m, axis=d)
    return s


def _reshaped_scale_shape(q_shape, s_shape, new_shape):
    groups = reshape_groups(q_shape, new_shape)
    if groups is None:
        return None
    out = [1] * len(new_shape)
    for gi, go in groups:
        kinds = {("full" if s_shape[i] == q_shape[i] else "one" if s_shape[i] == 1 else "grouped")
                 for i in gi if q_shape[i] != 1}
        if kinds == {"full"}:
            for o in go:
                out[o] = new_shape[o]
        elif kinds == {"grouped"} and len(gi) == 1 and len([o for o in go if new_shape[o] != 1]) == 1:
            o = next(o for o in go if new_shape[o] != 1)
            out[o] = s_shape[gi[0]]
        elif kinds - {"one"}:
            return None  # a group mixes shared and per-index axes, or splits groups
    return tuple(out)


def pack_codes(codes, axis: int, width: int):
    """Packs ``width``-bit codes (2 or 4; two's complement or unsigned) ``8 // width`` per byte
    along ``axis``, element ``j`` of each run in bits ``j*width ..``."""
    axis, per = axis % codes.ndim, 8 // width
    u = jnp.moveaxis((codes.astype(jnp.int32) & (2 ** width - 1)).astype(jnp.uint8), axis, -1)
    packed = u[..., 0::per]
    for j in range(1, per):
        packed = packed | (u[..., j::per] << (j * width))
    return jnp.moveaxis(packed, -1, axis)


def unpack_codes(packed, axis: int, width: int, *, signed: bool):
    """Inverse of :func:`pack_codes`: int8 codes, sign-extended when ``signed``."""
    axis, per, mask = axis % packed.ndim, 8 // width, 2 ** width - 1
    p = jnp.moveaxis(packed, axis, -1)
    parts = [(p >> (j * width)) & mask for j in range(per)]
    codes = jnp.stack(parts, axis=-1).reshape(p.shape[:-1] + (p.shape[-1] * per,)).astype(jnp.int8)
    if signed:
        half = 2 ** (width - 1)
        codes = jnp.where(codes >= half, codes - 2 * half, codes).astype(jnp.int8)
    return jnp.moveaxis(codes, -1, axis)


def pack_nibbles(codes, axis: int):
    """Packs 4-bit codes (int8 in [-8, 7] or [0, 15]) two per byte along ``axis``."""
    return pack_codes(codes, axis, 4)


def unpack_nibbles(packed, axis: int, *, signed: bool):
    """Inverse of :func:`pack_nibbles`: int8 codes, sign-extended when ``signed``."""
    return unpack_codes(packed, axis, 4, signed=signed)


def _grouped(w, axis, group_size):
    """``w`` with ``axis`` split into (groups, group_size), and the group axis index."""
    n = w.shape[axis]
    shape = w.shape[:axis] + (n // group_size, group_size) + w.shape[axis + 1:]
    return w.reshape(shape), axis + 1


# --------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------

def quantize(w, reduce_axes: Sequence[int], *, fmt: str = "int8", group_size: int | None = None,
             symmetric: bool = True, source: str = "", outliers: int = 0, clip=None) -> QArray:
    """Round-to-nearest quantization of ``w`` with scales shared over ``reduce_axes``.

    With ``group_size``, ``reduce_axes`` must be one axis (the contracting axis); scales are then
    per contiguous group of ``group_size`` along it. A group size that does not divide the axis
    gives a *ragged last group* (``n % group_size`` elements): the quantization grid is exactly
    that of groups ``[0, g), [g, 2g), ..., [n - n % g, n)``, and the scales are stored at the
    granularity ``d = gcd(n, group_size)`` (each group's scale repeated ``group_size / d`` times),
    so the layout stays "one scale per contiguous block of equal size" and everything downstream
    (matmul, GPTQ, layout ops, save/load) is unchanged; it costs ``group_size / d`` times the
    scale memory of a dividing group size. Formats: ``int8``, ``int4`` (packed along the first
    reduced axis), ``nf4`` (absmax per block, packed), ``fp8`` (e4m3, absmax / 448).
    Each dequantized element is within half a quantization step of the original (int formats).
    ``outliers``: per output channel, that many largest-magnitude weights along the (single)
    reduced axis are kept exactly beside the codes and left out of the scales.
    ``clip``: range shrink ratios in (0, 1], a scalar or an array of the scale's shape: the range
    each scale covers is ``clip * max|w|`` (symmetric, nf4, fp8) or ``clip * [min, max]``
    (asymmetric); weights outside it saturate. :mod:`~jaxpass.passes.quantize.clip` searches them.
    """
    reduce_axes = tuple(sorted(a % w.ndim for a in reduce_axes))
    if outliers:
        (axis,) = reduce_axes
        dense, idx, vals = split_outliers(jnp.asarray(w, jnp.float32), axis, outliers)
        q = quantize(dense, reduce_axes, fmt=fmt,
                     group_size=group_size, symmetric=symmetric, source=source, clip=clip)
        return dataclasses.replace(q, dtype=jnp.dtype(w.dtype), outlier_idx=idx,
                                   outlier_val=vals.astype(jnp.float16))
    w32 = jnp.asarray(w, jnp.float32)
    clip = None if clip is None else jnp.asarray(clip, jnp.float32)
    if group_size is not None and w.shape[reduce_axes[0]] % group_size:
        return _quantize_ragged(w32, reduce_axes[0], fmt, group_size, symmetric, source, clip,
                                jnp.dtype(w.dtype))
    if group_size is not None:
        (axis,) = reduce_axes
        g, red = _grouped(w32, axis, group_size)
        gclip = clip if clip is None or clip.ndim == 0 else jnp.expand_dims(clip, axis + 1)
        q = quantize(g, (red,), fmt=fmt, group_size=None, symmetric=symmetric, source=source,
                     clip=gclip)
        codes = q.codes().reshape(w.shape)
        scale = q.scale.reshape(q.scale.shape[:axis] + (-1,) + q.scale.shape[axis + 2:])
        zero = None if q.zero is None else q.zero.reshape(scale.shape)
        out = QArray(codes, scale, zero, jnp.dtype(w.dtype), fmt, None, source)
        return _pack(out, axis) if fmt in STORAGE_BITS else out
    shrink = 1.0 if clip is None else clip
    if fmt == "fp8":
        amax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True) * shrink
        scale = jnp.where(amax > 0, amax / FP8_E4M3_MAX, 1.0)
        q = jnp.clip(w32 / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)
        return QArray(q, scale, None, jnp.dtype(w.dtype), fmt, None, source)
    if fmt == "nf4":
        amax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True) * shrink
        scale = jnp.where(amax > 0, amax, 1.0)
        x = w32 / scale
        codes = jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(NF4_CODEBOOK)), axis=-1).astype(jnp.int8)
        return _pack(QArray(codes, scale, None, jnp.dtype(w.dtype), fmt, None, source), reduce_axes[0])
    bits = FORMAT_BITS[fmt]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True) * shrink
        scale = jnp.where(amax > 0, amax / qmax, 1.0)
        codes = jnp.clip(jnp.round(w32 / scale), -qmax, qmax).astype(jnp.int8)
        zero = None
    else:
        # Min-max with a float zero point (as llama.cpp's Q4_1 "scale + min"): the grid is
        # lo + k * scale exactly, so data already on such a grid is reproduced exactly.
        qmax = 2 ** bits - 1
        lo = jnp.min(w32, axis=reduce_axes, keepdims=True) * shrink
        hi = jnp.max(w32, axis=reduce_axes, keepdims=True) * shrink
        scale = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
        zero = -lo / scale
        codes = jnp.clip(jnp.round((w32 - lo) / scale), 0, qmax)
        codes = codes.astype(jnp.uint8 if bits == 8 else jnp.int8)
    out = QArray(codes, scale.astype(jnp.float32), zero, jnp.dtype(w.dtype), fmt, None, source)
    return _pack(out, reduce_axes[0]) if fmt in STORAGE_BITS else out


def ragged_groups(n: int, group_size: int) -> tuple[int, int, int]:
    """``(head, tail, d)`` for ``n`` elements in groups of ``group_size``: ``head`` elements in
    whole groups, a ragged last group of ``tail`` elements, and the storage granularity
    ``d = gcd(n, group_size)`` at which a ragged grouping's scales are stored."""
    tail = n % group_size
    return n - tail, tail, math.gcd(n, group_size)


def _quantize_ragged(w32, axis, fmt, group_size, symmetric, source, clip, dtype) -> QArray:
    """Groups of ``group_size`` along ``axis`` plus a ragged last group, stored at gcd granularity
    (see :func:`quantize`). ``clip`` (if an array) is in that storage layout."""
    n = w32.shape[axis]
    head, tail, d = ragged_groups(n, group_size)
    ch = ct = clip
    if clip is not None and clip.ndim:
        ch = lax.slice_in_dim(clip, 0, head // d, stride=group_size // d, axis=axis)
        ct = lax.slice_in_dim(clip, head // d, head // d + 1, axis=axis)
    parts = []
    if head:
        parts.append((quantize(lax.slice_in_dim(w32, 0, head, axis=axis), (axis,), fmt=fmt,
                               group_size=group_size, symmetric=symmetric, clip=ch), group_size // d))
    parts.append((quantize(lax.slice_in_dim(w32, head, n, axis=axis), (axis,), fmt=fmt,
                           group_size=None, symmetric=symmetric, clip=ct), tail // d))
    codes = jnp.concatenate([q.codes() for q, _ in parts], axis=axis)
    scale = jnp.concatenate([jnp.repeat(q.scale, r, axis=axis) for q, r in parts], axis=axis)
    zero = None if parts[0][0].zero is None else jnp.concatenate(
        [jnp.repeat(q.zero, r, axis=axis) for q, r in parts], axis=axis)
    out = QArray(codes, scale, zero, dtype, fmt, None, source)
    return _pack(out, axis) if fmt in STORAGE_BITS else out


def _pack(q: QArray, axis: int) -> QArray:
    return dataclasses.replace(q, qvalue=pack_codes(q.qvalue, axis, STORAGE_BITS[q.fmt]),
                               packed_axis=axis - q.qvalue.ndim)


def quantize_int8(w, reduce_axes, *, source: str = "") -> QArray:
    """Symmetric per-channel int8 (codes in [-127, 127], scale ``max|w| / 127``)."""
    return quantize(w, reduce_axes, fmt="int8", source=source)


def from_codes(codes, like: QArray, k_axis: int) -> QArray:
    """A QArray with ``like``'s format, scales and zero points but the given (unpacked) codes
    (as a calibration method such as GPTQ chose them), packed the way :func:`quantize` packs."""
    codes = jnp.asarray(codes)
    if like.fmt == "fp8":
        q = codes.astype(jnp.float8_e4m3fn)
    elif like.fmt == "int8" and like.zero is not None:
        q = codes.astype(jnp.uint8)
    else:
        q = codes.astype(jnp.int8)
    out = dataclasses.replace(like, qvalue=q, packed_axis=None)
    return _pack(out, k_axis) if like.fmt in STORAGE_BITS else out
