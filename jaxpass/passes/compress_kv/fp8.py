"""fp8 (e4m3) KV cache, per token and head: the int8 layout with float8 codes.

``k_q, v_q float8_e4m3fn [b, kvh, L, d]`` and one f32 scale per token and head ``[b, kvh, L]``
(``scale = max|x| / 448``, the largest finite e4m3 value), stored once, never broadcast to head
width. It follows the protocol of :mod:`jaxpass.kernels_pallas.decode_attention.formats`
(``init``, ``append``, ``dequantize``, ``nbytes``, a registered pytree); the decode-attention
kernels do not read it yet, so it is attended through the plain-JAX reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxpass.kernels_pallas.decode_attention import formats

E4M3_MAX = 448.0


def quantize_fp8(x):
    """Per row (last axis): ``(codes float8_e4m3fn, scale f32 [...])`` with x ~ codes * scale."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / E4M3_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    codes = jnp.clip(xf / safe[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    return codes, scale


def dequantize_fp8(codes, scale):
    return codes.astype(jnp.float32) * scale[..., None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8KV(formats._Base):
    k_q: jax.Array
    v_q: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array
    dtype: Any = dataclasses.field(default=jnp.bfloat16, metadata=dict(static=True))
    kind = "fp8"

    @property
    def shape(self):
        return tuple(self.k_q.shape)

    @classmethod
    def init(cls, batch, kv_heads, capacity, head_dim, dtype=jnp.bfloat16):
        q = jnp.zeros((batch, kv_heads, capacity, head_dim), jnp.float8_e4m3fn)
        s = jnp.zeros((batch, kv_heads, capacity), jnp.float32)
        return cls(q, q, s, s, jnp.dtype(dtype))

    def append(self, k_new, v_new, positions):
        b, kvh, _, _ = self.shape
        pos = formats._per_head(positions, b, kvh, "positions")
        rows = pos[..., None] + jnp.arange(k_new.shape[2], dtype=jnp.int32)
        kq, ks = quantize_fp8(k_new)
        vq, vs = quantize_fp8(v_new)
        upd = formats._vmap2(formats._scatter_rows)
        return Fp8KV(upd(self.k_q, rows, kq), upd(self.v_q, rows, vq),
                     upd(self.k_scale, rows, ks), upd(self.v_scale, rows, vs), self.dtype)

    def dequantize(self, lengths=None):
        del lengths
        return dequantize_fp8(self.k_q, self.k_scale), dequantize_fp8(self.v_q, self.v_scale)
