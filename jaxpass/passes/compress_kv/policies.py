"""What each method stores and how it updates and attends: one policy object per method.

A policy is a small frozen (hashable) dataclass; it is static aux data of the cache pytree, so
two caches built by the same pass have the same tree structure (a ``while_loop`` carry). Methods:

- ``init_state(b, L, kvh, d, dtype, layer, n_layers)``: the empty per-layer state;
- ``update(step)``: called by ``kv_cache_update`` (quantizing methods append here);
- ``attend(step, q, positions, scale, sliding_window)``: ``cached_attention``'s output;
- ``finish(step)``: the state after the step (eviction methods select here, with the attention
  statistics ``attend`` left on the step);
- ``dense_k`` / ``dense_v``: the state as a dense ``[b, L, kvh, d]`` array (for the generic
  fallback and for tests).

Quantizing methods (``QuantPolicy``) keep every token, in a format of
:mod:`jaxpass.kernels_pallas.decode_attention.formats` (int8, KIVI, Mustafar sparse) or
:mod:`.fp8`, at its absolute position; with ``sinks > 0`` the first tokens are also kept at full
precision beside the format (:class:`SinkedState`) and read from there. Eviction methods (``EvictPolicy``) keep ``capacity``
slots per layer and head, each with the absolute position of its token (RoPE was applied at that
position before caching, so relative distances stay exact) and an importance score.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.core.pass_api import PassError
from jaxpass.kernels_pallas.decode_attention import formats
from jaxpass.passes.compress_kv.attend import attend, new_tokens
from jaxpass.passes.compress_kv.fp8 import Fp8KV

_BIG = np.float32(3e38)  # numpy: importing jaxpass must not start a backend (jax.distributed)


def _decode_kernel():
    """The decode-attention kernel API, if this jaxpass has it (it is written alongside)."""
    try:
        from jaxpass.kernels_pallas.decode_attention import decode_attention
    except ImportError:
        return None
    return decode_attention


def _slots_to_dense(x, pos, length, dtype):
    """Slots ``x [b, kvh, C, d]`` at positions ``pos [b, kvh, C]`` -> dense ``[b, L, kvh, d]``
    (zeros where no slot holds the position)."""
    b, kvh, c, d = x.shape
    p = jnp.where(pos < 0, length, pos)
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(kvh)[None, :, None]
    dense = jnp.zeros((b, kvh, length, d), dtype).at[bi, hi, p].set(x.astype(dtype), mode="drop")
    return jnp.swapaxes(dense, 1, 2)


# ------------------------------------------------------------------------------------ quantizing
class SinkedState(NamedTuple):
    """A quantized cache whose first ``S`` tokens are also kept at full precision.

    Why: the first tokens of a sequence are attention sinks (StreamingLLM: every query reads
    them), so their quantization error reaches every output; on SmolLM2-135M
    KIVI-2's perplexity loss drops from +27% to about +9% when the first 4 tokens are read at full
    precision (docs/kv_cache.md). KVQuant and IntactKV keep them intact for the same reason.
    ``inner`` is the format object holding every token (the sinks too, so its kernels' layout is
    unchanged); ``k, v [b, kvh, S, d]`` (model dtype) override rows ``[0, S)`` when it is read.
    """

    inner: Any
    k: jax.Array
    v: jax.Array


def _write_sinks(dst, new, start):
    """``dst [b,kvh,S,d]`` with rows ``start + i`` of ``new [b,kvh,t,d]`` written where < S."""
    rows = start[:, None] + jnp.arange(new.shape[2], dtype=jnp.int32)       # [b, t]
    return jax.vmap(lambda d, r, n: d.at[:, r].set(n.astype(d.dtype), mode="drop"))(dst, rows, new)


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    name: str                       # "int8" | "fp8" | "kivi" | "mustafar"
    kind: str                       # formats kind ("int8", "kivi", "sparse") or "fp8"
    options: tuple = ()             # sorted (key, value) format options
    use_kernel: bool = True         # decode steps through decode_attention(backend="auto")
    sinks: int = 0                  # first tokens also kept (and read) at full precision

    def capacity(self, length: int, layer: int, n_layers: int) -> int:
        """Rows of the format: ``length`` rounded up to whole KIVI key groups, and for every
        format to a multiple of 16 (the decode kernels stream whole 16-row steps; a
        ``generate`` capacity of prompt + new tokens is rarely one). Rows past ``length``
        are never written or read."""
        unit = 16
        if self.kind == "kivi":
            g = dict(self.options)["group_size"]
            unit = g * 16 // math.gcd(g, 16)
        return -(-length // unit) * unit

    def init_state(self, b, length, kvh, d, dtype, layer, n_layers):
        cap = self.capacity(length, layer, n_layers)
        if self.kind == "fp8":
            inner = Fp8KV.init(b, kvh, cap, d, dtype)
        else:
            inner = formats.init(self.kind, b, kvh, cap, d, dtype, **dict(self.options))
        if not self.sinks:
            return inner
        z = jnp.zeros((b, kvh, min(self.sinks, cap), d), dtype)
        return SinkedState(inner, z, z)

    def append(self, state, k, v, start):
        """``state`` with ``k, v [b, kvh, t, d]`` written at positions ``start [b] + i``."""
        if not self.sinks:
            return state.append(k, v, start)
        return SinkedState(state.inner.append(k, v, start), _write_sinks(state.k, k, start),
                           _write_sinks(state.v, v, start))

    def dequantize(self, state, lengths):
        """Dense f32 ``k, v [b, kvh, cap, d]`` as attention reads them (sink rows at full
        precision when ``sinks > 0``)."""
        if not self.sinks:
            return state.dequantize(lengths)
        k, v = state.inner.dequantize(lengths)
        n = state.k.shape[2]
        return (k.at[:, :, :n].set(state.k.astype(k.dtype)),
                v.at[:, :, :n].set(state.v.astype(v.dtype)))

    def from_dense(self, k, v):
        """A cache holding ``k, v [b, kvh, T, d]`` at positions ``[0, T)`` (the cache-free
        forward's view of the compressed cache)."""
        b, kvh, t, d = k.shape
        cache = self.init_state(b, t, kvh, d, k.dtype, 0, 1)
        return self.append(cache, k, v, jnp.zeros((b,), jnp.int32))

    def update(self, step):
        start = step.positions[:, 0].astype(jnp.int32)
        step._new_state = self.append(step.side.state, jnp.swapaxes(step.k_new, 1, 2),
                                      jnp.swapaxes(step.v_new, 1, 2), start)

    def _dequantized(self, state, lengths):
        k, v = self.dequantize(state, lengths)
        cap = k.shape[2]
        ar = jnp.arange(cap, dtype=jnp.int32)
        pos = jnp.where(ar[None, None, :] < lengths[:, None, None], ar, -1)
        return k, v, jnp.broadcast_to(pos, k.shape[:3])

    def attend(self, step, q, positions, scale, sliding_window):
        b, t = positions.shape
        new_len = positions[:, -1].astype(jnp.int32) + 1
        if t == 1:
            kernel = (_decode_kernel() if (self.use_kernel and self.kind != "fp8") else None)
            if kernel is not None and sliding_window is None:
                st = step.new_state()
                # with sinks, the kernels read the sink rows as one more partial
                fmt, sinks = (st.inner, (st.k, st.v)) if self.sinks else (st, None)
                out = kernel(q[:, 0], fmt, new_len, scale=scale, backend="auto", sinks=sinks)
                return out[:, None].astype(q.dtype)
            # Decode over the cache as stored after the update (what the kernel reads).
            k, v, pos = self._dequantized(step.new_state(), new_len)
            return attend(q, k, v, pos, positions, scale=scale, sliding_window=sliding_window)[0]
        # A prefill chunk: earlier tokens from the compressed cache, this chunk's own tokens at
        # full precision (as KIVI's prefill does); the chunk is stored compressed afterwards.
        old_len = positions[:, 0].astype(jnp.int32)
        k, v, pos = self._dequantized(step.side.state, old_len)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        new = new_tokens(k, v, step.k_new, step.v_new, positions)
        return attend(q, k, v, pos, positions, scale=scale, sliding_window=sliding_window,
                      new=new)[0]

    def finish(self, step):
        return step._new_state

    def dense_k(self, state, shape, dtype, lengths=None):
        return self._dense(state, shape, dtype, lengths, 0)

    def dense_v(self, state, shape, dtype, lengths=None):
        return self._dense(state, shape, dtype, lengths, 1)

    def _dense(self, state, shape, dtype, lengths, which):
        b, length = shape[:2]
        if lengths is None:
            if self.kind == "kivi":
                raise ValueError("a KIVI cache is only readable with its lengths (which tokens "
                                 "are in the residual ring); use the step's view")
            lengths = jnp.full((b,), length, jnp.int32)
        x = self.dequantize(state, lengths)[which][:, :, :length]
        return jnp.swapaxes(x, 1, 2).astype(dtype)


# -------------------------------------------------------------------------------------- eviction
class SlotState(NamedTuple):
    """Kept tokens of one layer: ``k [b,kvh,C,dk]`` (``dk < d`` for ThinK), ``v [b,kvh,C,d]``,
    absolute positions ``pos int32 [b,kvh,C]`` (-1: empty), importance ``score f32 [b,kvh,C]``,
    and for ThinK the kept key channels ``channels int32 [b,kvh,dk]`` (else None)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    score: jax.Array
    channels: Any = None


def _pyramid_budgets(mean: int, n_layers: int, beta: float, floor: int) -> list[int]:
    """PyramidKV's arithmetic budgets: layer 0 largest, the last ``mean / beta``; mean ``mean``."""
    if n_layers == 1:
        return [mean]
    low = max(floor, int(round(mean / beta)))
    high = 2 * mean - low
    return [int(round(high - (high - low) * i / (n_layers - 1))) for i in range(n_layers)]


@dataclasses.dataclass(frozen=True)
class EvictPolicy:
    name: str                       # "streaming" | "h2o" | "snapkv" | "pyramidkv" | "think"
    budget: Any = None              # int tokens or float fraction of the cache length
    window: int | None = None       # recent tokens always kept / SnapKV observation window
    sinks: int = 4                  # StreamingLLM attention sinks
    pool: int = 7                   # SnapKV / PyramidKV max-pool width over positions
    beta: float = 20.0              # PyramidKV: last layer's budget is mean / beta
    channels: float | None = None   # ThinK: fraction of key channels kept

    def _mean_budget(self, length: int) -> int:
        if self.budget is None:
            return length
        n = int(round(self.budget * length)) if isinstance(self.budget, float) else int(self.budget)
        if n > length:
            raise PassError(f"CompressKV(budget={self.budget!r}): {n} tokens is more than the "
                            f"cache length {length}")
        if n < 1:
            raise PassError(f"CompressKV(budget={self.budget!r}) keeps no token of a "
                            f"{length}-token cache")
        return n

    def recent(self, capacity: int) -> int:
        """Newest tokens always kept."""
        if self.name == "streaming":
            return 0
        if self.name == "h2o":
            w = capacity // 2 if self.window is None else self.window
        else:
            w = 32 if self.window is None else self.window
        return max(0, min(w, capacity - 1))

    def capacity(self, length: int, layer: int, n_layers: int) -> int:
        mean = self._mean_budget(length)
        if self.name == "pyramidkv":
            floor = min(mean, self.recent(mean) + 1)
            budgets = _pyramid_budgets(mean, n_layers, self.beta, floor)
            return int(min(length, max(1, budgets[layer if 0 <= layer < n_layers else 0])))
        if self.name == "streaming" and mean <= self.sinks:
            raise PassError(f"CompressKV(method='streaming'): a budget of {mean} tokens leaves no "
                            f"room next to the {self.sinks} attention sinks")
        return mean

    def key_channels(self, d: int) -> int:
        if self.channels is None:
            return d
        return max(1, int(round(d * self.channels)))

    def init_state(self, b, length, kvh, d, dtype, layer, n_layers):
        cap = self.capacity(length, layer, n_layers)
        dk = self.key_channels(d)
        ch = (jnp.broadcast_to(jnp.arange(dk, dtype=jnp.int32), (b, kvh, dk))
              if self.channels is not None else None)
        return SlotState(jnp.zeros((b, kvh, cap, dk), dtype), jnp.zeros((b, kvh, cap, d), dtype),
                         jnp.full((b, kvh, cap), -1, jnp.int32),
                         jnp.zeros((b, kvh, cap), jnp.float32), ch)

    def update(self, step):
        pass  # eviction needs this step's attention: done in finish()

    def _think_channels(self, state, q, k_new):
        """ThinK: per KV head, the key channels with the largest ``|q_c| * |k_c|`` over the
        observation window (chosen when the layer's cache is first filled, then fixed)."""
        b, t, h, d = q.shape
        kvh = k_new.shape[2]
        dk = state.channels.shape[-1]
        w = min(self.window or 32, t)
        qg = q[:, -w:].astype(jnp.float32).reshape(b, w, kvh, h // kvh, d)
        qn = jnp.sqrt(jnp.sum(qg * qg, axis=(1, 3)))                          # [b,kvh,d]
        kn = jnp.sqrt(jnp.sum(jnp.square(k_new.astype(jnp.float32)), axis=1))  # [b,kvh,d]
        new = jnp.sort(jax.lax.top_k(qn * kn, dk)[1], axis=-1).astype(jnp.int32)
        empty = jnp.all(state.pos < 0, axis=-1)[..., None]
        return jnp.where(empty, new, state.channels)

    def attend(self, step, q, positions, scale, sliding_window):
        st = step.side.state
        if st.channels is None:
            new = new_tokens(st.k, st.v, step.k_new, step.v_new, positions)
            out, mass = attend(q, st.k, st.v, st.pos, positions, scale=scale,
                               sliding_window=sliding_window, out_dtype=q.dtype, new=new,
                               mass_rows=self._mass_rows(q.shape[1]))
            step.stats.update(new=new, mass=mass)
            return out
        # ThinK: stored keys have only the kept channels, so queries read them on those
        # channels; the step's own tokens are not pruned yet and are read on all channels (as
        # ThinK's prefill attends with whole keys and prunes the cache afterwards). One
        # attention over [q_kept | q] . [k_stored | 0] and [0 | k_new] gives both scores.
        ch = self._think_channels(st, q, step.k_new)
        b, t, h, d = q.shape
        kvh, dk = ch.shape[1], ch.shape[2]
        qg = q.reshape(b, t, kvh, h // kvh, d)
        q_kept = jnp.take_along_axis(qg, ch[:, None, :, None, :], axis=-1).reshape(b, t, h, dk)
        k_new_kept = jnp.take_along_axis(step.k_new, ch[:, None, :, :], axis=-1)
        step.stats["channels"] = ch
        new = new_tokens(st.k, st.v, k_new_kept, step.v_new, positions)
        k_old = jnp.pad(st.k, ((0, 0), (0, 0), (0, 0), (0, d)))
        k_new = jnp.pad(step.k_new, ((0, 0), (0, 0), (0, 0), (dk, 0)))
        both = new_tokens(k_old, st.v, k_new, step.v_new, positions)
        out, mass = attend(jnp.concatenate([q_kept, q], axis=-1), k_old, st.v, st.pos,
                           positions, scale=scale, sliding_window=sliding_window,
                           out_dtype=q.dtype, new=both, mass_rows=self._mass_rows(t))
        step.stats.update(new=new, mass=mass)
        return out

    def _mass_rows(self, t):
        """Query rows whose attention scores a slot: all (H2O accumulates every query's), else
        SnapKV's observation window, the last ``window`` (32) queries of the chunk."""
        return t if self.name == "h2o" else min(self.window or 32, t)

    def finish(self, step):
        st = step.side.state
        if "mass" not in step.stats:
            raise PassError(f"CompressKV(method={self.name!r}) at layer {step.side.layer}: the "
                            "cache was updated but jaxpass.cached_attention never read it, so "
                            "there are no attention scores to evict by")
        new, mass = step.stats["new"], step.stats["mass"]
        pos = jnp.concatenate([st.pos.astype(jnp.int32), new[2]], axis=-1)
        cap = st.pos.shape[-1]
        t = step.positions.shape[1]
        if self.name in ("snapkv", "pyramidkv") and self.pool > 1:
            mass = jax.lax.reduce_window(mass, -jnp.inf, jax.lax.max, (1, 1, self.pool),
                                         (1, 1, 1), "SAME")
        score = jnp.concatenate([st.score, jnp.zeros(mass.shape[:2] + (t,), jnp.float32)], -1)
        score = score + mass
        valid = pos >= 0
        if self.name == "streaming":
            pri = jnp.where(pos < self.sinks, _BIG, pos.astype(jnp.float32))
        else:
            newest = step.positions[:, -1].astype(jnp.int32)[:, None, None]
            pri = jnp.where(pos > newest - self.recent(cap), _BIG, score)
        pri = jnp.where(valid, pri, -jnp.inf)
        channels = step.stats.get("channels", st.channels)
        if t == 1:
            return replace_lowest(st, new, pos, score, pri, channels)
        return keep_highest(st, new, pos, score, pri, channels)

    def dense_k(self, state, shape, dtype, lengths=None):
        k = state.k
        if state.channels is not None:
            b, kvh, c, _ = k.shape
            full = jnp.zeros((b, kvh, c, shape[-1]), k.dtype)
            k = full.at[jnp.arange(b)[:, None, None, None], jnp.arange(kvh)[None, :, None, None],
                        jnp.arange(c)[None, None, :, None], state.channels[:, :, None, :]].set(k)
        return _slots_to_dense(k, state.pos, shape[1], dtype)

    def dense_v(self, state, shape, dtype, lengths=None):
        return _slots_to_dense(state.v, state.pos, shape[1], dtype)


def keep_highest(st: SlotState, new, pos, score, pri, channels) -> SlotState:
    """The ``C`` of the ``C + t`` candidates (slots, then ``new = (k, v, pos)`` head-major) with
    the highest priority ``pri [b,kvh,C+t]`` (ties: the earlier candidate), in position order."""
    cap = st.pos.shape[-1]
    k = jnp.concatenate([st.k, new[0]], axis=2)
    v = jnp.concatenate([st.v, new[1]], axis=2)
    _, idx = jax.lax.top_k(pri, cap)
    order = jnp.argsort(jnp.take_along_axis(pos, idx, axis=-1), axis=-1)
    idx = jnp.take_along_axis(idx, order, axis=-1)
    take = lambda x: jnp.take_along_axis(x, idx, axis=2)
    take4 = lambda x: jnp.take_along_axis(x, idx[..., None], axis=2)
    return SlotState(take4(k).astype(st.k.dtype), take4(v).astype(st.v.dtype), take(pos),
                     take(score), channels)


def replace_lowest(st: SlotState, new, pos, score, pri, channels) -> SlotState:
    """One new token (a decode step): the same kept set as :func:`keep_highest`, which drops
    exactly one of the ``C + 1`` candidates, the last one of lowest priority; here the new
    token takes that slot in place (or is dropped itself), so a step writes one row per head
    instead of gathering the whole cache. Slots are then not in position order (nothing reads
    them by order: visibility is by position)."""
    cap = st.pos.shape[-1]
    drop = cap - jnp.argmin(pri[..., ::-1], axis=-1)          # [b, kvh]; cap: the new token
    put = jax.vmap(jax.vmap(lambda dst, j, row: dst.at[j].set(row[0].astype(dst.dtype),
                                                              mode="drop")))
    return SlotState(put(st.k, drop, new[0]), put(st.v, drop, new[1]),
                     put(pos[..., :cap], drop, pos[..., cap:]),
                     put(score[..., :cap], drop, score[..., cap:]), channels)


def nbytes_per_token(cache, length: int) -> float:
    """Bytes of a cache pytree per token of length (what :func:`jaxpass.evaluate.kv_bytes_per_token`
    computes)."""
    leaves = jax.tree_util.tree_leaves(cache)
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves) / length
