"""A Llama-family decoder as a Flax NNX module, with an explicit KV cache.

Layout choices that passes rely on:
- every linear kernel is an ``nnx.Param`` of shape ``[in, out]`` applied as ``x @ W``, so a weight
  quantization pass sees a ``dot_general`` contracting the param's axis 0; the tied output
  projection contracts the embedding's axis 1 (``einsum("bsd,vd->bsv")``);
- attention and the KV cache go through the named ops of :mod:`jaxpass.models.attention`;
- the cache is a plain pytree (a tuple of :class:`KVCache` per layer) passed in and returned, so the
  whole decode step is a pure function of (params, cache, ids, positions).

Numerics follow Hugging Face's ``LlamaForCausalLM``: RMSNorm in float32 then cast, RoPE with
``rotate_half`` (non-interleaved) halves, softmax in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpass.models import attention as attn_ops
from jaxpass.models.config import LlamaConfig, inv_frequencies

_INIT_STD = 0.02


class KVCache(NamedTuple):
    """One layer's cache: k and v of shape ``[batch, max_len, num_kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array


class Linear(nnx.Module):
    """``y = x @ kernel (+ bias)`` with ``kernel`` stored ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int, *, bias: bool, config: LlamaConfig, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (d_in, d_out), config.param_dtype) * _INIT_STD)
        self.bias = nnx.Param(jnp.zeros((d_out,), config.param_dtype)) if bias else None
        self.dtype = config.dtype

    def __call__(self, x):
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``weight * x / rms(x)``, the normalisation computed in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, *, config: LlamaConfig):
        self.weight = nnx.Param(jnp.ones((dim,), config.param_dtype))
        self.eps = config.rms_norm_eps

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + jnp.float32(self.eps))).astype(dtype)
        return self.weight[...].astype(dtype) * normed


def rotary(x, positions, inv_freq):
    """Applies RoPE to ``x [b, t, heads, d]`` at int ``positions [b, t]`` (rotate_half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, t, d/2]
    emb = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        hd = c.head_dim
        d, qb = c.hidden_size, c.qkv_bias
        self.q_proj = Linear(d, c.num_heads * hd, bias=qb, config=c, rngs=rngs)
        self.k_proj = Linear(d, c.num_kv_heads * hd, bias=qb, config=c, rngs=rngs)
        self.v_proj = Linear(d, c.num_kv_heads * hd, bias=qb, config=c, rngs=rngs)
        self.o_proj = Linear(c.num_heads * hd, d, bias=False, config=c, rngs=rngs)
        self.config = c
        self.layer = layer
        self.inv_freq = tuple(float(f) for f in inv_frequencies(c))

    def _qkv(self, x, positions):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        inv = np.asarray(self.inv_freq, np.float32)
        return rotary(q, positions, inv), rotary(k, positions, inv), v

    def __call__(self, x):
        b, s, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q, k, v = self._qkv(x, positions)
        out = attn_ops.causal_attention(q, k, v, scale=self.config.head_dim ** -0.5,
                                        sliding_window=self.config.sliding_window)
        return self.o_proj(out.reshape(b, s, -1))

    def cached(self, x, cache: KVCache, positions):
        b, t, _ = x.shape
        q, k, v = self._qkv(x, positions)
        k_cache, v_cache = attn_ops.kv_cache_update(cache.k, cache.v, k, v, positions,
                                                    layer=self.layer)
        out = attn_ops.cached_attention(q, k_cache, v_cache, positions,
                                        scale=self.config.head_dim ** -0.5,
                                        sliding_window=self.config.sliding_window,
                                        layer=self.layer)
        return self.o_proj(out.reshape(b, t, -1)), KVCache(k_cache, v_cache)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False, config=c, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False, config=c, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False, config=c, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config=config)
        self.attn = Attention(config, layer, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))

    def cached(self, x, cache, positions):
        a, cache = self.attn.cached(self.input_norm(x), cache, positions)
        x = x + a
        return x + self.mlp(self.post_attn_norm(x)), cache


class Llama(nnx.Module):
    """Llama-family causal LM.

    - ``model(ids)``: ids int ``[b, s]`` -> float32 logits ``[b, s, vocab]`` (no cache);
    - ``model.init_cache(batch, max_len, dtype=None)`` -> tuple of :class:`KVCache`, one per layer;
    - ``model.forward_cached(ids, cache, positions)`` -> ``(logits, new_cache)``: prefill (``t``
      prompt tokens) or decode (``t == 1``); ``positions`` int32 ``[b, t]`` absolute and
      contiguous, or a scalar start position.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (c.vocab_size, c.hidden_size), c.param_dtype)
            * _INIT_STD)
        blocks = [Block(c, -1 if c.scan_layers else i, rngs=rngs) for i in range(c.num_layers)]
        self.layers = stack_blocks(blocks) if c.scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(c.hidden_size, config=c)
        self.lm_head = (None if c.tie_embeddings else
                        Linear(c.hidden_size, c.vocab_size, bias=False, config=c, rngs=rngs))

    def _embed(self, ids):
        ids = jnp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids must be int [batch, seq], got shape {ids.shape}")
        return jnp.take(self.embed[...], ids, axis=0).astype(self.config.dtype)

    def _logits(self, h):
        h = self.norm(h)
        if self.lm_head is None:
            return jnp.einsum("bsd,vd->bsv", h, self.embed[...].astype(h.dtype),
                              preferred_element_type=jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, ids):
        h = self._embed(ids)
        if self.config.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, layer_state):
                return nnx.merge(graphdef, layer_state)(h), None

            h = jax.lax.scan(body, h, stacked)[0]
        else:
            for block in self.layers:
                h = block(h)
        return self._logits(h)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (zeros): a tuple
        of :class:`KVCache` per layer, or with ``scan_layers`` one :class:`KVCache` whose arrays
        have a leading layer axis."""
        c = self.config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        dtype = jnp.dtype(dtype or c.dtype)
        if c.scan_layers:
            stacked = (c.num_layers,) + shape
            return KVCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
        return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                     for _ in range(c.num_layers))

    def forward_cached(self, ids, cache, positions):
        h = self._embed(ids)
        b, t = h.shape[:2]
        positions = jnp.asarray(positions, jnp.int32)
        if positions.ndim == 0:
            positions = positions + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t))
        if self.config.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(h, xs):
                layer_state, layer_cache = xs
                h, layer_cache = nnx.merge(graphdef, layer_state).cached(
                    h, KVCache(*layer_cache), positions)
                return h, layer_cache

            h, new_cache = jax.lax.scan(body, h, (stacked, KVCache(*cache)))
            return self._logits(h), new_cache
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        new_cache = []
        for block, layer_cache in zip(self.layers, cache):
            h, layer_cache = block.cached(h, KVCache(*layer_cache), positions)
            new_cache.append(layer_cache)
        return self._logits(h), tuple(new_cache)


def stack_blocks(blocks: list[Block]) -> Block:
    """One :class:`Block` whose params are the given blocks' params stacked on a new leading
    axis (the scan-over-layers layout; only ever called inside ``jax.lax.scan`` per slice)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def unstack_blocks(stacked: Block, n: int) -> list[Block]:
    """Inverse of :func:`stack_blocks`."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state)) for i in range(n)]


def with_scan_layers(model: Llama, scan_layers: bool = True) -> Llama:
    """The same weights with ``config.scan_layers`` switched (stacked <-> per-layer)."""
    c = model.config
    if c.scan_layers == scan_layers:
        return model
    new = nnx.eval_shape(lambda: Llama(c.replace(scan_layers=scan_layers), rngs=nnx.Rngs(0)))
    new.embed = model.embed
    new.norm = model.norm
    new.lm_head = model.lm_head
    if scan_layers:
        new.layers = stack_blocks(list(model.layers))
    else:
        blocks = unstack_blocks(model.layers, c.num_layers)
        for i, b in enumerate(blocks):
            b.attn.layer = i
        new.layers = nnx.List(blocks)
    return new


def abstract_model(config: LlamaConfig) -> Llama:
    """A :class:`Llama` whose params are ``jax.ShapeDtypeStruct`` (no memory): for tracing,
    transform-time benchmarks and shape checks of 8B-sized configs on a laptop."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def random_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """A :class:`Llama` with random weights: kernels and embeddings normal(0, 0.02), norm
    weights 1, biases 0 (the distribution ``Llama.__init__`` uses).

    Drawn with numpy on the host: no per-shape XLA compilations, so building many small test
    models or a 1B-shaped benchmark model is fast.
    """
    model = abstract_model(config)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape, dtype = var.shape, var.dtype
        if path[-1] == "bias":
            value = np.zeros(shape, np.float32)
        elif path[-1] == "weight":  # RMSNorm scales
            value = np.ones(shape, np.float32)
        else:
            value = rng.standard_normal(shape, np.float32) * np.float32(_INIT_STD)
        var.set_value(jnp.asarray(value, dtype))
    return model
