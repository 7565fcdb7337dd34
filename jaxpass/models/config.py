"""Hyperparameters of a Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2).

One frozen dataclass covers the family: the members differ only in grouped-query attention
(``num_kv_heads``), RoPE base and scaling, RMSNorm epsilon, tied embeddings, q/k/v biases (Qwen2)
and sliding-window attention (Mistral v0.1). The config is hashable so it can be a static argument.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    ``kind``:
      - ``"llama3"``: Llama 3.1/3.2's smooth per-frequency scaling (``factor``,
        ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``);
      - ``"linear"``: position interpolation, every inverse frequency divided by ``factor``;
      - ``"freq_factors"``: llama.cpp's explicit per-frequency divisors (the ``rope_freqs.weight``
        tensor of a GGUF file), stored in ``freq_factors``.
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in ("llama3", "linear", "freq_factors"):
            raise ValueError(f"RopeScaling.kind={self.kind!r} is not supported; expected one of "
                             "'llama3', 'linear', 'freq_factors'")
        if self.kind == "freq_factors" and not self.freq_factors:
            raise ValueError("RopeScaling(kind='freq_factors') needs freq_factors")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> "RopeScaling | None":
        """From a Hugging Face ``config.json`` ``rope_scaling`` entry (None stays None)."""
        if not d:
            return None
        kind = d.get("rope_type", d.get("type"))
        if kind in (None, "default"):
            return None
        if kind == "llama3":
            return cls("llama3", float(d["factor"]), float(d["low_freq_factor"]),
                       float(d["high_freq_factor"]), int(d["original_max_position_embeddings"]))
        if kind == "linear":
            return cls("linear", float(d["factor"]))
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3, linear)")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family decoder's shape and numerics.

    ``dtype`` is the compute dtype of activations, ``param_dtype`` the storage dtype of weights;
    logits are always returned in float32. ``scan_layers`` stacks the per-layer weights along a
    leading axis and runs the layers with ``jax.lax.scan`` (one traced layer instead of N).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    scan_layers: bool = False

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_heads={self.num_heads}; pass head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        # Normalise dtypes to their names so the config stays hashable and printable.
        object.__setattr__(self, "dtype", np.dtype(_dtype(self.dtype)).name)
        object.__setattr__(self, "param_dtype", np.dtype(_dtype(self.param_dtype)).name)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + emb + d

    def kv_bytes_per_token(self, dtype=None) -> int:
        """Bytes of an uncompressed K and V cache per token (all layers)."""
        itemsize = np.dtype(_dtype(dtype or self.dtype)).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _dtype(d):
    import jax.numpy as jnp
    return jnp.dtype(d)


def inv_frequencies(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32), scaling applied.

    Computed in float32 as Hugging Face does (``base ** (arange(0, d, 2) / d)``), so rotary
    angles match the reference implementation bit for bit at a given position.
    """
    d = config.head_dim
    inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.int64)
                                                   .astype(np.float32) / np.float32(d)))
    inv = inv.astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    if s.kind == "freq_factors":
        ff = np.asarray(s.freq_factors, np.float32)
        if ff.shape != inv.shape:
            raise ValueError(f"rope freq_factors has {ff.shape[0]} entries, expected {inv.shape[0]}")
        return (inv / ff).astype(np.float32)
    # llama3
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
