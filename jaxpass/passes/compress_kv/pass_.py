"""``passes.CompressKV``: quantized, evicted and sparse KV caches that really are smaller."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_KV, PassError, PassResult
from jaxpass.core.report import PassReport
from jaxpass.passes.compress_kv.layout import ATTEND, CAUSAL, UPDATE, CacheBuilder, _nested_names
from jaxpass.passes.compress_kv.policies import EvictPolicy, QuantPolicy
from jaxpass.passes.compress_kv.values import KVSide, KVStep, VStep

QUANT_METHODS = ("int8", "fp8", "kivi", "mustafar")
EVICT_METHODS = ("streaming", "h2o", "snapkv", "pyramidkv", "think")
METHODS = QUANT_METHODS + EVICT_METHODS


@dataclasses.dataclass(frozen=True)
class CompressKV:
    """Compresses the KV cache of models that expose it through jaxpass's named cache ops.

    The transformed model's ``t.init_cache(batch, max_len)`` builds a smaller cache pytree (the
    buffers shrink; nothing is masked in a full-size buffer), and ``t.method("forward_cached")``
    (what :func:`jaxpass.models.generate` and ``evaluate.perplexity(..., cache_chunk=)`` use)
    takes and returns it: each layer's ``jaxpass.kv_cache_update`` stores into the compressed
    form and ``jaxpass.cached_attention`` attends over it (decode steps of quantized caches go
    to ``decode_attention(..., backend="auto")``: Pallas on GPU, the XLA reference elsewhere).
    The cache-free forward ``t(ids)`` attends over K/V round-tripped through the format for the
    quantizing methods and is unchanged for eviction methods (they keep all prompt tokens for
    the prompt's own attention and evict afterwards); the report says so.

    Methods (``method=``):
      - ``"int8"`` / ``"fp8"``: symmetric absmax per token and head (one f32 scale per token and
        head, never broadcast to head width).
      - ``"kivi"``: ``bits`` 2 or 4; keys per channel in groups of ``group_size`` tokens, values
        per token (groups of ``v_group_size`` channels), the newest ``residual`` tokens in full
        precision.
      - ``"mustafar"``: per token, the ``1 - sparsity`` largest-magnitude entries of K and of V,
        in a bitmap + values format.
      - ``"streaming"``: StreamingLLM, ``sinks`` first tokens + the most recent ones.
      - ``"h2o"``: heavy hitters by accumulated attention + a recent window (``window``, default
        half the budget).
      - ``"snapkv"``: tokens ranked by the attention of an observation window (the last
        ``window`` queries of each prefill chunk, default 32) max-pooled over ``pool`` positions,
        plus the window itself; decode steps keep ranking by accumulated attention.
      - ``"pyramidkv"``: SnapKV with layer budgets decreasing linearly from the first to the last
        layer (mean ``budget``, last layer ``budget / beta``).
      - ``"think"``: ThinK, query-driven key-channel pruning: each KV head stores only the
        ``channels`` fraction of key channels with the largest ``|q_c| |k_c|`` over the
        observation window (chosen on the layer's first chunk), and queries are gathered to them
        to read the stored keys (a step's own new tokens are read on all channels, as ThinK's
        prefill attends with whole keys before pruning the cache).
        With ``budget`` it also evicts like SnapKV.

    Args:
      budget: tokens kept per layer and head: an int, or a float fraction of the cache length
        (``max_len`` of ``init_cache``). Required by the eviction methods (optional for think).
      include / exclude: regular expressions on cache layer names ``layers[i]``: layers not
        selected keep the model's dense cache.
      full_precision_sinks: quantizing methods only (int8, fp8, kivi, mustafar): the first
        this-many tokens of each sequence are also stored at full precision and attention reads
        them from there (attention sinks, as KVQuant and IntactKV keep them). Default 0, the
        methods as published. Why: the first tokens are attention sinks (StreamingLLM):
        every query reads them, so their quantization error reaches every output: on SmolLM2-135M, KIVI-2's
        perplexity loss goes from +27% to about +9% with 4 sinks (docs/kv_cache.md). Costs
        ``2 * S * d`` model-dtype values per layer and KV head; decode steps give the rows to
        the decode-attention kernel as ``sinks`` (it masks those positions in the format and
        merges one more partial).
    """

    method: str = "int8"
    bits: int | None = None
    residual: int = 128
    budget: int | float | None = None
    group_size: int = 32
    v_group_size: int | None = 32
    window: int | None = None
    sinks: int = 4
    pool: int = 7
    beta: float = 20.0
    channels: float = 0.5
    sparsity: float = 0.5
    use_kernel: bool = True
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    full_precision_sinks: int = 0

    order: ClassVar[int] = ORDER_KV

    def __post_init__(self):
        if self.method not in METHODS:
            raise PassError(f"CompressKV(method={self.method!r}): methods are {METHODS}")
        if self.method == "kivi":
            if self.bits not in (2, 4):
                raise PassError(f"CompressKV(method='kivi', bits={self.bits!r}): KIVI supports "
                                "bits=2 or bits=4")
            if self.residual < self.group_size or self.residual % self.group_size:
                raise PassError(f"CompressKV(residual={self.residual}): the residual window must "
                                f"be a positive multiple of group_size={self.group_size}")
        elif self.bits is not None and not (self.method == "int8" and self.bits == 8):
            raise PassError(f"CompressKV(method={self.method!r}, bits={self.bits!r}): bits "
                            "applies to method='kivi' (2 or 4) only")
        b = self.budget
        if self.method in QUANT_METHODS and b is not None:
            raise PassError(f"CompressKV(method={self.method!r}) keeps every token; budget= is "
                            "for the eviction methods "
                            "(streaming, h2o, snapkv, pyramidkv, think)")
        if self.method in EVICT_METHODS and self.method != "think" and b is None:
            raise PassError(f"CompressKV(method={self.method!r}) needs budget= (int tokens or "
                            "a fraction in (0, 1])")
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise PassError(f"CompressKV(budget={b!r}): use an int (tokens) or a float "
                                "fraction in (0, 1]")
            if isinstance(b, float) and not 0.0 < b <= 1.0:
                raise PassError(f"CompressKV(budget={b!r}): a fraction must be in (0, 1]")
            if isinstance(b, int) and b <= 0:
                raise PassError(f"CompressKV(budget={b!r}): a token budget must be positive")
        if self.method == "think" and not 0.0 < self.channels <= 1.0:
            raise PassError(f"CompressKV(channels={self.channels!r}): the kept fraction of key "
                            "channels must be in (0, 1]")
        if self.method == "mustafar" and not 0.0 <= self.sparsity < 1.0:
            raise PassError(f"CompressKV(sparsity={self.sparsity!r}): must be in [0, 1)")
        fps = self.full_precision_sinks
        if isinstance(fps, bool) or not isinstance(fps, int) or fps < 0:
            raise PassError(f"CompressKV(full_precision_sinks={fps!r}): use an int >= 0 (how "
                            "many first tokens are kept at full precision)")
        if fps and self.method not in QUANT_METHODS:
            raise PassError(f"CompressKV(method={self.method!r}, full_precision_sinks={fps}): "
                            f"full-precision sinks apply to the quantizing methods "
                            f"{QUANT_METHODS}; StreamingLLM keeps its sinks with sinks=")
        if self.window is not None and self.window < 0:
            raise PassError(f"CompressKV(window={self.window!r}) must be >= 0")

    # -- the policy -------------------------------------------------------------------------
    def policy(self):
        m = self.method
        sk = self.full_precision_sinks
        if m == "int8":
            return QuantPolicy("int8", "int8", (), self.use_kernel, sk)
        if m == "fp8":
            return QuantPolicy("fp8", "fp8", (), self.use_kernel, sk)
        if m == "kivi":
            opts = dict(bits=self.bits, group_size=self.group_size,
                        v_group_size=self.v_group_size, residual=self.residual)
            return QuantPolicy(f"kivi{self.bits}", "kivi", tuple(sorted(opts.items())),
                               self.use_kernel, sk)
        if m == "mustafar":
            return QuantPolicy("mustafar", "sparse", (("sparsity", self.sparsity),),
                               self.use_kernel, sk)
        name = "snapkv" if (m == "think" and self.budget is not None) else m
        return EvictPolicy(name, self.budget, self.window, self.sinks, self.pool, self.beta,
                           self.channels if m == "think" else None)

    def _config(self) -> str:
        keys = ["method"]
        if self.method == "kivi":
            keys += ["bits", "residual", "group_size", "v_group_size"]
        if self.full_precision_sinks:
            keys.append("full_precision_sinks")
        if self.budget is not None:
            keys.append("budget")
        if self.method in ("h2o", "snapkv", "pyramidkv", "think") and self.window is not None:
            keys.append("window")
        if self.method == "streaming":
            keys.append("sinks")
        if self.method == "think":
            keys.append("channels")
        if self.method == "mustafar":
            keys.append("sparsity")
        parts = [f"{k}={getattr(self, k)!r}" for k in keys]
        if self.include is not None or self.exclude is not None:
            parts.append(f"include={self.include!r}, exclude={self.exclude!r}")
        return ", ".join(parts)

    # -- the pass ---------------------------------------------------------------------------
    def run(self, program) -> PassResult:
        policy = self.policy()
        report = PassReport("CompressKV", self._config())
        names = _nested_names(program.jaxpr)
        if not names & {CAUSAL, UPDATE, ATTEND}:
            inline = ""
            if {"exp", "reduce_max", "dot_general"} <= names:
                inline = (" The program does contain a softmax between matmuls (attention written "
                          "inline), but CompressKV only rewrites the named ops: it cannot know "
                          "where an inline attention keeps its cache.")
            raise PassError(
                "CompressKV: the model exposes no attention or cache operations "
                "(jaxpass.causal_attention / kv_cache_update / cached_attention)." + inline +
                " Route the model's attention and KV cache through jaxpass.models.attention's "
                "named ops (see docs/kv_cache.md, 'Your own model')")
        handlers = {UPDATE: _update_rule, ATTEND: _attend_rule}
        structured_only = {UPDATE, ATTEND}
        if isinstance(policy, QuantPolicy):
            handlers[CAUSAL] = _causal_rule(policy)
            report.notes.append("the cache-free forward attends over K/V stored in the "
                                f"{policy.name} format (the prompt as the compressed cache would "
                                "hold it)")
            if policy.sinks:
                report.notes.append(f"the first {policy.sinks} tokens are kept and read at full "
                                    "precision (full_precision_sinks); decode steps pass them to "
                                    "decode_attention as sink rows (one more partial)")
        else:
            report.notes.append(f"{policy.name}: the cache-free forward is unchanged (eviction "
                                "applies to the cache, after each prefill chunk / decode step)")
        report.notes.append("the KV cache comes from t.init_cache(batch, max_len); "
                            "t.method('forward_cached') takes it (a dense cache passes through "
                            "unchanged)")
        report.matched_ops.extend(sorted(names & {CAUSAL, UPDATE, ATTEND}))
        return PassResult({}, Rules(handlers, frozenset(structured_only)), report,
                          tolerance=None,
                          inputs=CacheBuilder(policy, self.include, self.exclude))


def _update_rule(ctx, eqn, invals):
    kc, vc, k, v, positions = invals
    if not (isinstance(kc, KVSide) and isinstance(vc, KVSide) and kc.role == "k"):
        return NotImplemented
    step = KVStep(kc, k, v, positions)
    kc.policy.update(step)
    ctx.record("rewrite", eqn, kc.source, f"{kc.policy.name} cache update")
    return step, VStep(step, vc)


def _attend_rule(ctx, eqn, invals):
    q, kstep, vstep, positions = invals
    if not isinstance(kstep, KVStep):
        return NotImplemented
    p = eqn.params
    ctx.record("rewrite", eqn, kstep.source, f"attention over the {kstep.policy.name} cache")
    return kstep.policy.attend(kstep, q, positions, p["scale"], p.get("sliding_window"))


def _causal_rule(policy):
    from jaxpass.models.attention import causal_attention

    def rule(ctx, eqn, invals):
        q, k, v = invals
        if any(not hasattr(x, "dtype") or compat.is_literal(x) for x in (q, k, v)):
            return NotImplemented
        t = k.shape[1]
        cache = policy.from_dense(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        lengths = jnp.full((k.shape[0],), t, jnp.int32)
        kd, vd = policy.dequantize(cache, lengths)
        kd = jnp.swapaxes(kd[:, :, :t], 1, 2).astype(k.dtype)
        vd = jnp.swapaxes(vd[:, :, :t], 1, 2).astype(v.dtype)
        ctx.record("rewrite", eqn, "", f"K/V through the {policy.name} format")
        return causal_attention(q, kd, vd, **eqn.params)

    return rule
