"""KV cache formats: the contract between ``passes.CompressKV`` and the decode-attention kernels.

Every cache is a frozen dataclass registered as a pytree (arrays are leaves, options are static aux
data), so it can be a ``jit`` argument or a ``while_loop`` / ``scan`` carry. The pass builds caches
only through this module (``init``, ``from_dense``, ``.append``); the kernels read the arrays
directly; ``.dequantize(lengths)`` is the reference meaning of every format.

Common layout (per layer), head-major so one kernel program streams one head's rows contiguously::

    b batch, kvh KV heads, L capacity (positions), d head dim; query heads hq = kvh * groups (GQA)
    lengths int32 [b] (or [b, kvh] for per-head eviction): rows [0, lengths) are valid

Formats (``kind`` / class):

* ``"dense"`` ``DenseKV``: ``k, v [b,kvh,L,d]`` in the model dtype (bf16 usually).
* ``"int8"`` ``Int8KV``: ``k_q, v_q int8 [b,kvh,L,d]``, symmetric absmax per token and head:
  ``x = q * scale``, ``scale = max|x| / 127`` stored once per row as ``k_scale, v_scale f32
  [b,kvh,L]``.
* ``"kivi"`` ``KiviKV`` (bits 2 or 4): asymmetric, ``x = code * scale + min``.

  - keys per channel over groups of ``group_size`` (G) tokens: ``k_codes uint8 [b,kvh,L,d*bits/8]``,
    ``k_scale, k_min f32 [b,kvh,L/G,d]``;
  - values per token over groups of ``v_group_size`` (Gv) channels: ``v_codes uint8
    [b,kvh,L,d*bits/8]``, ``v_scale, v_min f32 [b,kvh,L,d/Gv]``;
  - codes are packed **planar** along d: with ``n = d * bits / 8`` bytes per row, byte ``j`` holds
    channel ``j + p*n`` in bits ``[p*bits, (p+1)*bits)`` for plane ``p`` (so a kernel unpacks by
    shifting whole tiles, never interleaving);
  - a full-precision residual ring ``k_res, v_res [b,kvh,R,d]`` (R = ``residual``, a multiple of
    G) holds the most recent, not yet quantized tokens; position ``p`` lives in slot ``p % R``.
    For a length ``n`` the first ``quantized_length(n) = G * ceil(max(n - R, 0) / G)`` positions
    are read from the codes and positions ``[quantized_length(n), n)`` (between R - G + 1 and R of
    them once n > R) from the ring. Appending quantizes the oldest G residual tokens each time the
    ring would overflow: KIVI's "quantize a group when it fills", as a pure function of the length,
    so kernels need no extra state. Attention = quantized part + residual part (log-sum-exp).
* ``"sparse"`` ``SparseKV`` (Mustafar): per token and head, the ``keep = round(d * (1 - sparsity))``
  largest-magnitude entries of K and of V: ``k_bitmap, v_bitmap uint8 [b,kvh,L,d/8]`` (bit ``i``
  of byte ``j`` = channel ``8j + i`` kept) and ``k_values, v_values [b,kvh,L,keep]`` in channel
  order, model dtype. Each token is compressed on its own, so no dense window is needed for
  correctness; new tokens are compressed on append.

Appends write tokens ``[pos, pos + T)``; tokens past the capacity are dropped (scatter with
``mode="drop"``): size the capacity for prompt + generation. All functions are jit-able and work
with per-row (``[b]``) or per-head (``[b, kvh]``) positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

KINDS = ("dense", "int8", "kivi", "sparse")


def _static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata=dict(static=True))


def _check_kv(k, v, name="k/v"):
    if k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"{name}: expected k and v of equal shape [b, kvh, T, d], got "
                         f"{getattr(k, 'shape', None)} and {getattr(v, 'shape', None)}")


def _per_head(x, b, kvh, name):
    """``x`` int ``[]``, ``[b]`` or ``[b, kvh]`` -> int32 ``[b, kvh]``."""
    x = jnp.asarray(x, jnp.int32)
    if x.ndim == 1:
        if x.shape[0] != b:
            raise ValueError(f"{name}: expected shape [{b}] or [{b}, {kvh}], got {x.shape}")
        x = x[:, None]
    elif x.ndim == 2 and x.shape != (b, kvh):
        raise ValueError(f"{name}: expected shape [{b}] or [{b}, {kvh}], got {x.shape}")
    elif x.ndim > 2:
        raise ValueError(f"{name}: expected shape [{b}] or [{b}, {kvh}], got {x.shape}")
    return jnp.broadcast_to(x, (b, kvh))


def _vmap2(fn):
    """Maps a per-(batch, head) function over the two leading axes."""
    return jax.vmap(jax.vmap(fn))


def _scatter_rows(dst, rows, new):
    """``dst[rows] = new`` along axis 0 of one head; rows out of range are dropped."""
    return dst.at[rows].set(new.astype(dst.dtype), mode="drop")


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


class _Base:
    kind: str

    @property
    def nbytes(self) -> int:
        """Bytes of every array of the cache (what decode attention reads, at most)."""
        return _nbytes(self)


# ----------------------------------------------------------------------------------------- dense
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKV(_Base):
    """Uncompressed cache in the model dtype: ``k, v [b, kvh, L, d]``."""

    k: jax.Array
    v: jax.Array
    kind = "dense"

    @property
    def shape(self):
        return tuple(self.k.shape)

    @property
    def dtype(self):
        return self.k.dtype

    @classmethod
    def init(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16):
        z = jnp.zeros((batch, kv_heads, capacity, head_dim), dtype)
        return cls(z, z)

    def append(self, k_new, v_new, positions):
        _check_kv(k_new, v_new, "append")
        b, kvh, _, _ = self.shape
        pos = _per_head(positions, b, kvh, "positions")
        rows = pos[..., None] + jnp.arange(k_new.shape[2], dtype=jnp.int32)
        upd = _vmap2(_scatter_rows)
        return DenseKV(upd(self.k, rows, k_new), upd(self.v, rows, v_new))

    def dequantize(self, lengths=None):
        del lengths
        return self.k, self.v


# ------------------------------------------------------------------------------------------ int8
def quantize_int8(x):
    """Symmetric absmax int8 per row (last axis): ``(q int8, scale f32 [...])``, x = q * scale."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(xf / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_int8(q, scale):
    return q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8KV(_Base):
    """int8 codes ``[b,kvh,L,d]`` plus one f32 scale per token and head ``[b,kvh,L]``."""

    k_q: jax.Array
    v_q: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    dtype: Any = _static(jnp.bfloat16)
    kind = "int8"

    @property
    def shape(self):
        return tuple(self.k_q.shape)

    @classmethod
    def init(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16):
        q = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.int8)
        s = jnp.zeros((batch, kv_heads, capacity), jnp.float32)
        return cls(q, q, s, s, jnp.dtype(dtype))

    def append(self, k_new, v_new, positions):
        _check_kv(k_new, v_new, "append")
        b, kvh, _, _ = self.shape
        pos = _per_head(positions, b, kvh, "positions")
        rows = pos[..., None] + jnp.arange(k_new.shape[2], dtype=jnp.int32)
        kq, ks = quantize_int8(k_new)
        vq, vs = quantize_int8(v_new)
        upd = _vmap2(_scatter_rows)
        return Int8KV(upd(self.k_q, rows, kq), upd(self.v_q, rows, vq),
                      upd(self.k_scale, rows, ks), upd(self.v_scale, rows, vs), self.dtype)

    def dequantize(self, lengths=None):
        del lengths
        return dequantize_int8(self.k_q, self.k_scale), dequantize_int8(self.v_q, self.v_scale)


# ------------------------------------------------------------------------------------------ kivi
def pack_planar(codes, bits):
    """uint8 codes ``[..., d]`` (< 2**bits) -> ``[..., d*bits/8]`` planar (see module docstring)."""
    per = 8 // bits
    n = codes.shape[-1] // per
    codes = codes.astype(jnp.uint8)
    out = codes[..., :n]
    for p in range(1, per):
        out = out | (codes[..., p * n:(p + 1) * n] << (p * bits))
    return out


def unpack_planar(packed, bits):
    """Inverse of ``pack_planar``: uint8 ``[..., n]`` -> codes uint8 ``[..., n * 8 / bits]``."""
    mask = (1 << bits) - 1
    return jnp.concatenate([(packed >> (p * bits)) & mask for p in range(8 // bits)], axis=-1)


def _asym_quant(xf, axis, bits):
    """Asymmetric min/max quantization reducing over ``axis``: ``(codes, scale, min)``."""
    mn = jnp.min(xf, axis=axis, keepdims=True)
    mx = jnp.max(xf, axis=axis, keepdims=True)
    scale = (mx - mn) / float((1 << bits) - 1)
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(jnp.round((xf - mn) / safe), 0, (1 << bits) - 1).astype(jnp.uint8)
    return codes, scale, mn


def quantize_kivi_keys(k, bits, group_size):
    """Keys ``[..., T, d]`` (T a multiple of G) per channel over G tokens.

    Returns ``(packed uint8 [..., T, d*bits/8], scale, min f32 [..., T/G, d])``.
    """
    *lead, t, d = k.shape
    g = k.astype(jnp.float32).reshape(*lead, t // group_size, group_size, d)
    codes, scale, mn = _asym_quant(g, -2, bits)
    return (pack_planar(codes.reshape(*lead, t, d), bits), scale[..., 0, :], mn[..., 0, :])


def quantize_kivi_values(v, bits, group_size):
    """Values ``[..., T, d]`` per token over groups of Gv channels.

    Returns ``(packed uint8 [..., T, d*bits/8], scale, min f32 [..., T, d/Gv])``.
    """
    *lead, t, d = v.shape
    g = v.astype(jnp.float32).reshape(*lead, t, d // group_size, group_size)
    codes, scale, mn = _asym_quant(g, -1, bits)
    return pack_planar(codes.reshape(*lead, t, d), bits), scale[..., 0], mn[..., 0]


def dequantize_kivi_keys(packed, scale, mn, bits, group_size):
    codes = unpack_planar(packed, bits).astype(jnp.float32)
    rep = lambda a: jnp.repeat(a, group_size, axis=-2)
    return codes * rep(scale) + rep(mn)


def dequantize_kivi_values(packed, scale, mn, bits, group_size):
    codes = unpack_planar(packed, bits).astype(jnp.float32)
    rep = lambda a: jnp.repeat(a, group_size, axis=-1)
    return codes * rep(scale) + rep(mn)


def quantized_length(lengths, group_size, residual):
    """How many leading positions of a KIVI cache of this length are read from the codes."""
    lengths = jnp.asarray(lengths, jnp.int32)
    over = jnp.maximum(lengths - residual, 0)
    return ((over + group_size - 1) // group_size) * group_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KiviKV(_Base):
    """KIVI 2/4-bit cache with a full-precision residual ring (module docstring)."""

    k_codes: jax.Array
    k_scale: jax.Array
    k_min: jax.Array
    v_codes: jax.Array
    v_scale: jax.Array
    v_min: jax.Array
    k_res: jax.Array
    v_res: jax.Array
    bits: int = _static(4)
    group_size: int = _static(32)
    v_group_size: int = _static(32)
    residual: int = _static(128)
    kind = "kivi"

    @property
    def shape(self):
        b, kvh, cap, _ = self.k_codes.shape
        return (b, kvh, cap, self.k_res.shape[-1])

    @property
    def dtype(self):
        return self.k_res.dtype

    @classmethod
    def init(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16, *, bits=4,
             group_size=32, v_group_size=None, residual=128, stats_dtype=jnp.float32):
        v_group_size = head_dim if v_group_size is None else v_group_size
        v_group_size = min(v_group_size, head_dim)
        if bits not in (2, 4):
            raise ValueError(f"kivi: bits must be 2 or 4, got {bits}")
        if capacity % group_size:
            raise ValueError(f"kivi: capacity {capacity} must be a multiple of group_size "
                             f"{group_size}")
        if residual < group_size or residual % group_size:
            raise ValueError(f"kivi: residual {residual} must be a positive multiple of "
                             f"group_size {group_size}")
        if head_dim % v_group_size or (head_dim * bits) % 8 or head_dim % (8 // bits):
            raise ValueError(f"kivi: head_dim {head_dim} must be a multiple of v_group_size "
                             f"{v_group_size} and of {8 // bits}")
        b, h, n = batch, kv_heads, head_dim * bits // 8
        codes = jnp.zeros((b, h, capacity, n), jnp.uint8)
        if jnp.dtype(stats_dtype) not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"kivi: stats_dtype must be float32 or bfloat16, got {stats_dtype}")
        kstat = jnp.zeros((b, h, capacity // group_size, head_dim), stats_dtype)
        vstat = jnp.zeros((b, h, capacity, head_dim // v_group_size), stats_dtype)
        res = jnp.zeros((b, h, residual, head_dim), dtype)
        return cls(codes, kstat, kstat, codes, vstat, vstat, res, res, bits, group_size,
                   v_group_size, residual)

    def quantized_length(self, lengths):
        return quantized_length(lengths, self.group_size, self.residual)

    def append(self, k_new, v_new, positions):
        _check_kv(k_new, v_new, "append")
        b, kvh, cap, d = self.shape
        pos = _per_head(positions, b, kvh, "positions")
        if k_new.shape[2] == 1:
            return self._append_token(k_new, v_new, pos)
        return self._append_general(k_new, v_new, pos)

    def _append_general(self, k_new, v_new, pos):
        """Any number of tokens: the ring plus the new tokens as one window, every group that
        could complete quantized, the due ones written and the ring rebuilt."""
        b, kvh, cap, d = self.shape
        t = k_new.shape[2]
        G, R, bits, gv = self.group_size, self.residual, self.bits, self.v_group_size
        n_groups = -(-(R + t) // G)

        def one(kc, ks, km, vc, vs, vm, kr, vr, kn, vn, p):
            nq_old = quantized_length(p, G, R)
            nq_new = quantized_length(p + t, G, R)
            start = p - R
            slots = jnp.mod(start + jnp.arange(R, dtype=jnp.int32), R)
            pad = jnp.zeros((n_groups * G, d), kr.dtype)
            win_k = jnp.concatenate([kr[slots], kn.astype(kr.dtype), pad])
            win_v = jnp.concatenate([vr[slots], vn.astype(vr.dtype), pad])
            off = nq_old - start
            gk = jax.lax.dynamic_slice_in_dim(win_k, off, n_groups * G)
            gvv = jax.lax.dynamic_slice_in_dim(win_v, off, n_groups * G)
            pk, sk, mk = quantize_kivi_keys(gk, bits, G)
            pv, sv, mv = quantize_kivi_values(gvv, bits, gv)
            g0 = nq_old // G
            gidx = g0 + jnp.arange(n_groups, dtype=jnp.int32)
            gidx = jnp.where(gidx * G < nq_new, gidx, cap // G)      # out of range: dropped
            rows = (gidx[:, None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(-1)
            kc, vc = _scatter_rows(kc, rows, pk), _scatter_rows(vc, rows, pv)
            vs, vm = _scatter_rows(vs, rows, sv), _scatter_rows(vm, rows, mv)
            ks, km = _scatter_rows(ks, gidx, sk), _scatter_rows(km, gidx, mk)
            end = p + t
            s = jnp.arange(R, dtype=jnp.int32)
            ps = (end - 1) - jnp.mod(end - 1 - s, R)                 # newest position in slot s
            widx = ps - start
            win_k = win_k[:R + t]
            win_v = win_v[:R + t]
            keep = ps >= 0
            kr = jnp.where(keep[:, None], win_k[widx], 0).astype(kr.dtype)
            vr = jnp.where(keep[:, None], win_v[widx], 0).astype(vr.dtype)
            return kc, ks, km, vc, vs, vm, kr, vr

        out = _vmap2(one)(self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale,
                          self.v_min, self.k_res, self.v_res, k_new, v_new, pos)
        return KiviKV(*out, self.bits, self.group_size, self.v_group_size, self.residual)

    def _append_token(self, k_new, v_new, pos):
        """One decode token, the same result as the general path at a fraction of its work.

        Before token ``p`` is written, every unquantized position lies in the ring, and a group
        is due exactly when ``quantized_length`` grows: then positions ``[nq, nq + G)`` (whole
        ring slots ``[nq % R, nq % R + G)``, as R is a multiple of G) are quantized. That
        happens once every G steps; the G ring rows are quantized at every step anyway (a few
        KB per head) and written only when due (else to row ``cap``: dropped), so the cache
        arrays are updated in place by one scatter each, with no branch that would make XLA
        copy them. Then the token is written into its ring slot.
        """
        b, kvh, cap, d = self.shape
        G, R, bits, gv = self.group_size, self.residual, self.bits, self.v_group_size
        nq = quantized_length(pos, G, R)
        due = quantized_length(pos + 1, G, R) > nq

        def one(kc, ks, km, vc, vs, vm, kr, vr, p0, f):
            at = jnp.mod(p0, R)
            pk, sk, mk = quantize_kivi_keys(jax.lax.dynamic_slice_in_dim(kr, at, G), bits, G)
            pv, sv, mv = quantize_kivi_values(jax.lax.dynamic_slice_in_dim(vr, at, G), bits, gv)
            rows = jnp.where(f, p0, cap) + jnp.arange(G, dtype=jnp.int32)      # cap: dropped
            grp = jnp.where(f, p0 // G, cap // G)[None]
            return (_scatter_rows(kc, rows, pk), _scatter_rows(ks, grp, sk),
                    _scatter_rows(km, grp, mk), _scatter_rows(vc, rows, pv),
                    _scatter_rows(vs, rows, sv), _scatter_rows(vm, rows, mv))

        arrays = _vmap2(one)(self.k_codes, self.k_scale, self.k_min, self.v_codes, self.v_scale,
                             self.v_min, self.k_res, self.v_res, nq, due)
        write = _vmap2(lambda ring, x, s: jax.lax.dynamic_update_slice_in_dim(
            ring, x.astype(ring.dtype), s, 0))
        slot = jnp.mod(pos, R)
        return KiviKV(*arrays, write(self.k_res, k_new, slot), write(self.v_res, v_new, slot),
                      self.bits, self.group_size, self.v_group_size, self.residual)

    def dequantize(self, lengths=None):
        """Dense f32 ``k, v [b,kvh,L,d]`` in position order; rows >= lengths are zero."""
        if lengths is None:
            raise ValueError("KiviKV.dequantize needs lengths (which rows come from the ring)")
        b, kvh, cap, d = self.shape
        ln = _per_head(lengths, b, kvh, "lengths")
        kq = dequantize_kivi_keys(self.k_codes, self.k_scale, self.k_min, self.bits,
                                  self.group_size)
        vq = dequantize_kivi_values(self.v_codes, self.v_scale, self.v_min, self.bits,
                                    self.v_group_size)
        R = self.residual
        posn = jnp.arange(cap, dtype=jnp.int32)
        nq = self.quantized_length(ln)[..., None]
        from_codes = (posn < nq)[..., None]
        in_ring = ((posn >= nq) & (posn < ln[..., None]))[..., None]
        ring_k = jnp.take(self.k_res.astype(jnp.float32), posn % R, axis=2)
        ring_v = jnp.take(self.v_res.astype(jnp.float32), posn % R, axis=2)
        k = jnp.where(from_codes, kq, jnp.where(in_ring, ring_k, 0.0))
        v = jnp.where(from_codes, vq, jnp.where(in_ring, ring_v, 0.0))
        return k, v


# ---------------------------------------------------------------------------------------- sparse
def sparsify_topk(x, keep):
    """Per row (last axis), keep the ``keep`` largest magnitudes: ``(bitmap uint8, values)``."""
    d = x.shape[-1]
    _, idx = jax.lax.top_k(jnp.abs(x.astype(jnp.float32)), keep)
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(x, idx, axis=-1)
    mask = jnp.zeros(x.shape, jnp.bool_)
    mask = jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)
    bits = mask.reshape(*x.shape[:-1], d // 8, 8).astype(jnp.uint8)
    bitmap = jnp.sum(bits << jnp.arange(8, dtype=jnp.uint8), axis=-1).astype(jnp.uint8)
    return bitmap, vals


def bitmap_mask(bitmap):
    """uint8 ``[..., d/8]`` -> bool ``[..., d]``."""
    bits = (bitmap[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(*bitmap.shape[:-1], bitmap.shape[-1] * 8).astype(jnp.bool_)


def densify(bitmap, values):
    """Inverse of ``sparsify_topk`` (zeros where dropped), in f32."""
    mask = bitmap_mask(bitmap)
    slot = jnp.clip(jnp.cumsum(mask, axis=-1) - 1, 0, values.shape[-1] - 1)
    dense = jnp.take_along_axis(values.astype(jnp.float32), slot, axis=-1)
    return jnp.where(mask, dense, 0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SparseKV(_Base):
    """Mustafar per-token magnitude sparsity: bitmaps ``[b,kvh,L,d/8]`` + kept values."""

    k_bitmap: jax.Array
    k_values: jax.Array
    v_bitmap: jax.Array
    v_values: jax.Array
    kind = "sparse"

    @property
    def shape(self):
        b, kvh, cap, n = self.k_bitmap.shape
        return (b, kvh, cap, n * 8)

    @property
    def keep(self):
        return self.k_values.shape[-1]

    @property
    def dtype(self):
        return self.k_values.dtype

    @classmethod
    def init(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16, *, sparsity=0.5):
        if head_dim % 8:
            raise ValueError(f"sparse: head_dim {head_dim} must be a multiple of 8")
        keep = keep_count(head_dim, sparsity)
        bm = jnp.zeros((batch, kv_heads, capacity, head_dim // 8), jnp.uint8)
        vals = jnp.zeros((batch, kv_heads, capacity, keep), dtype)
        return cls(bm, vals, bm, vals)

    def append(self, k_new, v_new, positions):
        _check_kv(k_new, v_new, "append")
        b, kvh, _, _ = self.shape
        pos = _per_head(positions, b, kvh, "positions")
        rows = pos[..., None] + jnp.arange(k_new.shape[2], dtype=jnp.int32)
        kb, kv = sparsify_topk(k_new.astype(self.dtype), self.keep)
        vb, vv = sparsify_topk(v_new.astype(self.dtype), self.keep)
        upd = _vmap2(_scatter_rows)
        return SparseKV(upd(self.k_bitmap, rows, kb), upd(self.k_values, rows, kv),
                        upd(self.v_bitmap, rows, vb), upd(self.v_values, rows, vv))

    def dequantize(self, lengths=None):
        del lengths
        return densify(self.k_bitmap, self.k_values), densify(self.v_bitmap, self.v_values)


def keep_count(head_dim: int, sparsity: float) -> int:
    """Entries kept per token: ``round(d * (1 - sparsity))``, at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparse: sparsity must be in [0, 1), got {sparsity}")
    return max(1, int(round(head_dim * (1.0 - sparsity))))


# ----------------------------------------------------------------------------------- constructors
_CLASSES = {"dense": DenseKV, "int8": Int8KV, "kivi": KiviKV, "sparse": SparseKV}
KVCache = DenseKV | Int8KV | KiviKV | SparseKV


def init(kind, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16, **options):
    """An empty cache of ``kind`` (KINDS). Options: kivi ``bits, group_size, v_group_size,
    residual``; sparse ``sparsity``."""
    if kind not in _CLASSES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind in ("dense", "int8") and options:
        raise ValueError(f"{kind}: takes no options, got {sorted(options)}")
    return _CLASSES[kind].init(batch, kv_heads, capacity, head_dim, jnp.dtype(dtype), **options)


def from_dense(kind, k, v, *, capacity=None, lengths=None, dtype=None, **options):
    """A cache of ``kind`` holding dense ``k, v [b, kvh, T, d]`` at positions ``[0, T)``.

    ``capacity`` (default T, rounded up to the KIVI group) is the number of positions the cache
    can hold; ``lengths`` (default T) says which rows are valid (rows past a row's length are
    stored too, but attention never reads them). ``dtype`` defaults to ``k.dtype``.
    """
    _check_kv(k, v)
    b, kvh, t, d = k.shape
    capacity = t if capacity is None else int(capacity)
    if kind == "kivi":
        g = options.get("group_size", 32)
        capacity = -(-capacity // g) * g
    if capacity < t:
        raise ValueError(f"capacity {capacity} is smaller than the {t} tokens given")
    cache = init(kind, b, kvh, capacity, d, dtype or k.dtype, **options)
    if kind == "kivi" and lengths is not None:
        # KIVI's split into codes/ring depends on the length: append exactly the valid prefix
        # per row (rows past it are zeroed so they never leak into a group's statistics).
        ln = _per_head(lengths, b, kvh, "lengths")
        valid = jnp.arange(t)[None, None, :, None] < ln[..., None, None]
        k, v = jnp.where(valid, k, 0).astype(k.dtype), jnp.where(valid, v, 0).astype(v.dtype)
        return _kivi_from_prefix(cache, k, v, ln)
    return cache.append(k, v, jnp.zeros((b,), jnp.int32))


def _kivi_from_prefix(cache, k, v, ln):
    """A KIVI cache holding per-head valid prefixes of lengths ``ln`` of ``k, v`` (rows past
    ``ln`` already zeroed): the same state as appending the prefix token by token.

    One append of all T tokens gives the right codes for every group below
    ``quantized_length(ln)`` (those groups hold valid tokens only); groups past it are never read
    (and are re-quantized by later appends), so only the ring has to be rebuilt for length ``ln``.
    """
    t = k.shape[2]
    full = cache.append(k, v, jnp.zeros(ln.shape, jnp.int32))
    R = cache.residual
    s = jnp.arange(R, dtype=jnp.int32)
    ps = (ln[..., None] - 1) - jnp.mod(ln[..., None] - 1 - s, R)      # [b, kvh, R]
    idx = jnp.clip(ps, 0, t - 1)[..., None]
    ok = (ps >= 0)[..., None]
    k_res = jnp.where(ok, jnp.take_along_axis(k, idx, axis=2), 0).astype(cache.dtype)
    v_res = jnp.where(ok, jnp.take_along_axis(v, idx, axis=2), 0).astype(cache.dtype)
    return dataclasses.replace(full, k_res=k_res, v_res=v_res)


def cache_from_dense_like(cache, k, v, lengths=None):
    """``from_dense`` with the kind and options of an existing cache (used by tests/benches)."""
    opts = {}
    if isinstance(cache, KiviKV):
        opts = dict(bits=cache.bits, group_size=cache.group_size,
                    v_group_size=cache.v_group_size, residual=cache.residual,
                    stats_dtype=cache.k_scale.dtype)
    elif isinstance(cache, SparseKV):
        opts = dict(sparsity=1.0 - cache.keep / cache.shape[-1])
    return from_dense(cache.kind, k, v, capacity=cache.shape[2], lengths=lengths, **opts)


__all__ = [
    "KINDS", "DenseKV", "Int8KV", "KiviKV", "SparseKV", "KVCache", "init", "from_dense",
    "quantized_length", "quantize_int8", "dequantize_int8", "quantize_kivi_keys",
    "quantize_kivi_values", "dequantize_kivi_keys", "dequantize_kivi_values", "pack_planar",
    "unpack_planar", "sparsify_topk", "densify", "bitmap_mask", "keep_count",
]
