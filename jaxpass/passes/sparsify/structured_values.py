"""The values and rules of structured pruning (:mod:`jaxpass.passes.sparsify.structured`).

:class:`ChannelPruned` is a matmul weight with whole rows and/or columns removed,
:class:`PrunedVector` a per-channel parameter (a bias, a scale) with its pruned channels removed,
and :class:`CompactActivation` an activation that holds only a group's kept channels. The rules
(:data:`RULES`) carry compact activations through matmuls, elementwise ops, concatenations, the
named attention and KV-cache ops and custom-JVP activations, and re-do layout ops at the compact
size. The same rules run the analysis (``probe`` values: full size, tagged with the producing
weights, recording where they escape) and the rewrite (compact values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import numpy as np

import jax
import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.interpreter import Interpreter, Rules
from jaxpass.core.pass_api import PassError
from jaxpass.core.values import ValueBacked, is_structured, reshape_groups

ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "max", "min", "neg", "exp", "exp2", "log", "log1p", "expm1",
    "logistic", "tanh", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "integer_pow", "pow",
    "abs", "sign", "square", "sin", "cos", "tan", "atan2", "select_n", "clamp", "floor", "ceil",
    "round", "is_finite", "ge", "gt", "le", "lt", "eq", "ne", "and", "or", "not", "stop_gradient",
})
_SAME_LAYOUT = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
#: Source prefix of compact activations in interpreter events (``act:tag1|tag2``).
ACT_PREFIX = "act:"
#: During an analysis run: the tags of compact activations that became program outputs.
_PROBE_OUTPUTS: set | None = None


@contextlib.contextmanager
def recording_program_outputs():
    """Collects (into the yielded set) the tags of probe activations that leave the program:
    ``at_program_output`` has no event log to write to."""
    global _PROBE_OUTPUTS
    _PROBE_OUTPUTS = set()
    try:
        yield _PROBE_OUTPUTS
    finally:
        _PROBE_OUTPUTS = None


def _move_axis(name, params, axis, in_shape, out_shape):
    """Where negative ``axis`` is after a layout equation (None: the channel axis was changed)."""
    if axis is None:
        return None
    nd = len(in_shape)
    pos = axis % nd
    if name in _SAME_LAYOUT:
        return axis
    if name == "transpose":
        return tuple(params["permutation"]).index(pos) - len(out_shape)
    if name == "squeeze":
        dims = [d % nd for d in params["dimensions"]]
        return axis if all(d < pos for d in dims) else None
    if name in ("slice", "dynamic_slice"):
        # Slicing leading (layer) axes keeps the channel axis, if its extent is untouched.
        return axis if out_shape[pos - nd + len(out_shape)] == in_shape[pos] and len(out_shape) == nd else None
    return None


@dataclasses.dataclass
class ChannelPruned(ValueBacked):
    """A matmul weight with whole rows (``k_group``: its input channels) and/or columns
    (``n_group``: its output channels) removed. ``value`` is the smaller weight; ``bias``
    (consumers with ``compensate=True``) is added to the matmul's output. Axes are negative, so
    they stay valid when a scan slices leading layer axes. ``probe`` marks the full-size stand-in
    of the analysis run (see the module docstring)."""

    value: Any
    bias: Any = None
    k_group: str | None = None
    n_group: str | None = None
    k_axis: int | None = None
    n_axis: int | None = None
    probe: bool = False
    source: str = ""

    format_name = "channel-pruned"

    def describe(self) -> str:
        parts = [f"{jnp.dtype(self.dtype).name}{list(self.shape)}"]
        if self.k_group:
            parts.append("input channels pruned")
        if self.n_group:
            parts.append("output channels pruned")
        if self.bias is not None:
            parts.append("+ compensation bias")
        return parts[0] + " (" + ", ".join(parts[1:]) + ")"

    def materialize(self):
        if self.probe:
            return self.value
        raise PassError(f"{self.source}: a channel-pruned weight reached an op that needs the "
                        "full-width weight; the structured-pruning analysis should have kept it "
                        "dense (please report this model)")

    def apply_layout(self, name, params, *index_operands):
        from jaxpass.passes.sparsify.values import layout_array
        if self.bias is not None and name not in _SAME_LAYOUT:
            return None
        moved = layout_array(self.value, name, params, index_operands)
        if moved is None:
            return None
        k = _move_axis(name, params, self.k_axis, self.shape, moved.shape)
        n = _move_axis(name, params, self.n_axis, self.shape, moved.shape)
        if (self.k_axis is not None and k is None) or (self.n_axis is not None and n is None):
            return None
        return dataclasses.replace(self, value=moved, k_axis=k, n_axis=n)


jax.tree_util.register_dataclass(
    ChannelPruned, data_fields=["value", "bias"],
    meta_fields=["k_group", "n_group", "k_axis", "n_axis", "probe", "source"])


@dataclasses.dataclass
class CompactActivation(ValueBacked):
    """An activation holding only the kept channels of a group (``axis``, negative); during the
    analysis run, the full activation tagged with the producers it came from."""

    value: Any
    tags: tuple = ()
    axis: int = -1
    probe: bool = False
    #: analysis run: how many aligned blocks the channel axis may at most be cut into (a reshape
    #: into heads coarsens it to the head count; grouped-query attention to the KV head count)
    n: int = 0

    format_name = "compact-channels"

    @property
    def source(self) -> str:
        return ACT_PREFIX + "|".join(self.tags)

    def at_program_output(self):
        """A program output is seen by the caller: during the analysis, record the escape."""
        if self.probe and _PROBE_OUTPUTS is not None:
            _PROBE_OUTPUTS.update(self.tags)
        return self.materialize()

    def materialize(self):
        if self.probe:
            return self.value
        raise PassError(f"channels of {self.tags} reached an op that needs every channel; the "
                        "structured-pruning analysis should have left this group unpruned "
                        "(please report this model)")

    def apply_layout(self, name, params, *index_operands):
        """Layout ops that keep every channel together on one axis. The op is re-done here with
        the channel axis at its compact size (the traced params name the full size)."""
        from jaxpass.passes.sparsify.values import layout_array
        nd, pos, c = self.ndim, self.axis % self.ndim, self.shape[self.axis]
        p = dict(params)
        n = self.n
        if name in _SAME_LAYOUT:
            return dataclasses.replace(self, value=layout_array(self.value, name, p, index_operands))
        if name == "transpose":
            new_pos, out_nd = tuple(p["permutation"]).index(pos), nd
        elif name == "squeeze":
            dims = {d % nd for d in p["dimensions"]}
            if pos in dims:
                return None
            new_pos, out_nd = pos - sum(d < pos for d in dims), nd - len(dims)
        elif name == "broadcast_in_dim":
            shape = list(p["shape"])
            new_pos, out_nd = p["broadcast_dimensions"][pos], len(shape)
            shape[new_pos] = c
            p["shape"] = tuple(shape)
        elif name == "reshape":
            # Row-major: the channel axis must lead its group of merged / split axes (size-1 axes
            # aside), and the group's leading output axis carries it on. The traced sizes are the
            # full ones; the compact size follows from the compact element count.
            if p.get("dimensions") is not None:
                return None
            sizes = list(p["new_sizes"])
            rest = int(np.prod([d for i, d in enumerate(self.shape) if i != pos]))
            full_in = list(self.shape)
            full_in[pos] = int(np.prod(sizes)) // max(rest, 1)
            grp = next((g for g in reshape_groups(full_in, sizes) or () if pos in g[0]), None)
            if grp is None:
                return None
            gi, go = grp
            if any(full_in[i] != 1 for i in gi if i < pos):
                return None
            lead = [o for o in go if sizes[o] != 1]
            if not lead:
                return None
            new_pos, out_nd = lead[0], len(sizes)
            in_total = int(np.prod([self.shape[i] for i in gi]))
            others = int(np.prod([sizes[o] for o in go if o != new_pos]))
            if in_total % others:
                return None
            sizes[new_pos] = in_total // others
            p["new_sizes"] = tuple(sizes)
            n = math.gcd(self.n, sizes[new_pos]) if self.probe else self.n
        elif name in ("slice", "dynamic_slice"):
            if name == "slice":
                if p["start_indices"][pos] != 0 or (p.get("strides") or [1] * nd)[pos] != 1:
                    return None
                lim = list(p["limit_indices"])
                full_extent = self.probe and lim[pos] == c
                lim[pos] = c
                p["limit_indices"] = tuple(lim)
            else:
                sizes = list(p["slice_sizes"])
                full_extent = self.probe and sizes[pos] == c
                sizes[pos] = c
                p["slice_sizes"] = tuple(sizes)
            if self.probe and not full_extent:
                return None
            new_pos, out_nd = pos, nd
        else:
            return None
        moved = layout_array(self.value, name, p, index_operands)
        if moved is None:
            return None
        return dataclasses.replace(self, value=moved, axis=new_pos - out_nd, n=n)


jax.tree_util.register_dataclass(CompactActivation, data_fields=["value"],
                                 meta_fields=["tags", "axis", "probe", "n"])


@dataclasses.dataclass
class PrunedVector(CompactActivation):
    """A per-channel parameter of a channel group (a bias, a scale: ``[layers..., channels]``)
    holding the kept channels. It enters the program as the compact activation it is."""

    format_name = "channel-pruned vector"

    def describe(self) -> str:
        return f"{jnp.dtype(self.dtype).name}{list(self.shape)} (channels pruned)"


jax.tree_util.register_dataclass(PrunedVector, data_fields=["value"],
                                 meta_fields=["tags", "axis", "probe", "n"])


# --------------------------------------------------------------------------------------------
# Rules (the same for the analysis run and the rewrite)
# --------------------------------------------------------------------------------------------

def _dot_rule(ctx, eqn, invals):
    weights = [i for i, v in enumerate(invals) if isinstance(v, ChannelPruned)]
    acts = [i for i, v in enumerate(invals) if isinstance(v, CompactActivation)]
    if not weights and not acts:
        return NotImplemented
    if len(weights) != 1 or len(acts) > 1:
        return NotImplemented
    wi = weights[0]
    w, x = invals[wi], invals[1 - wi]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, xc = ((lc, rc)[wi], (lc, rc)[1 - wi])
    wb = (lb, rb)[wi]
    if len(wc) != 1 or w.k_axis is None or wc[0] != w.k_axis % w.ndim or wb:
        return NotImplemented
    compact_in = isinstance(x, CompactActivation)
    if compact_in:
        if len(xc) != 1 or xc[0] != x.axis % x.ndim:
            return NotImplemented
        if w.probe:
            ctx.record("rewrite", eqn, w.source, f"probe-consumer:{x.n}:" + "|".join(x.tags))
        elif w.k_group is None or w.k_group not in x.tags:
            return NotImplemented
    elif w.probe:
        ctx.record("rewrite", eqn, w.source, "probe-plain-input")
    elif w.k_group is not None:
        return NotImplemented
    xv = x.value if compact_in else x
    (out,) = compat.bind_eqn(eqn, [w.value, xv] if wi == 0 else [xv, w.value])
    if w.n_axis is None:
        return [out]
    free = [d for d in range(w.ndim) if d not in wc]
    n_batch = len(lb)
    lhs_free = invals[0].ndim - len(lc) - len(lb)
    pos = n_batch + (lhs_free if wi == 1 else 0) + free.index(w.n_axis % w.ndim)
    out_axis = pos - out.ndim
    if w.bias is not None:
        shape = [1] * out.ndim
        shape[pos] = out.shape[pos]
        out = out + w.bias.reshape(shape).astype(out.dtype)
    if w.n_group is None:
        return [out]
    return [CompactActivation(out, (w.n_group,), out_axis, w.probe, out.shape[out_axis])]


def _elementwise_rule(ctx, eqn, invals):
    acts = [v for v in invals if isinstance(v, CompactActivation)]
    if not acts:
        return NotImplemented
    first = acts[0]
    nd, c = first.ndim, first.shape[first.axis]
    for v in invals:
        if isinstance(v, CompactActivation):
            if v.ndim != nd or v.axis != first.axis or v.shape[v.axis] != c:
                return NotImplemented
        elif is_structured(v):
            return NotImplemented
        elif np.shape(v) != () and (np.ndim(v) != nd or np.shape(v)[first.axis] != 1):
            return NotImplemented     # a full-width operand: the interpreter materializes
    if not first.probe and len({a.tags for a in acts}) > 1:
        return NotImplemented
    tags = tuple(sorted(set().union(*(a.tags for a in acts))))
    outs = compat.bind_eqn(eqn, [v.value if isinstance(v, CompactActivation) else v for v in invals])
    n = math.gcd(*(a.n for a in acts))
    return [CompactActivation(o, tags, first.axis, first.probe, n) for o in outs]


def _concatenate_rule(ctx, eqn, invals):
    """Concatenation along another axis (RoPE's halves) keeps the channel axis whole."""
    acts = [v for v in invals if isinstance(v, CompactActivation)]
    if not acts or len(acts) != len(invals):
        return NotImplemented
    first = acts[0]
    dim = eqn.params["dimension"]
    if dim == first.axis % first.ndim or any(a.axis != first.axis for a in acts):
        return NotImplemented
    if not first.probe and len({a.tags for a in acts}) > 1:
        return NotImplemented
    (out,) = compat.bind_eqn(eqn, [a.value for a in acts])
    tags = tuple(sorted(set().union(*(a.tags for a in acts))))
    return [CompactActivation(out, tags, first.axis, first.probe, math.gcd(*(a.n for a in acts)))]


def _attention_rule(ctx, eqn, invals):
    """``jaxpass.causal_attention(q [b,s,hq,d], k, v [b,s,hkv,d])`` on compact heads: whole KV
    groups (a KV head and its ``hq / hkv`` query heads) are the units, so the op runs on the kept
    heads with the same grouping."""
    if len(invals) != 3 or not all(isinstance(x, CompactActivation) for x in invals):
        return NotImplemented
    q, k, v = invals
    if any(x.axis % x.ndim != x.ndim - 2 for x in invals) or k.shape[-2] != v.shape[-2] \
            or q.shape[-2] % k.shape[-2]:
        return NotImplemented
    if not q.probe and len({x.tags for x in invals}) > 1:
        return NotImplemented
    (out,) = compat.bind_eqn(eqn, [x.value for x in invals])
    tags = tuple(sorted(set(q.tags) | set(k.tags) | set(v.tags)))
    return [CompactActivation(out, tags, -2, q.probe, math.gcd(q.n, k.n, v.n))]


def _custom_jvp_rule(ctx, eqn, invals):
    """A custom_jvp activation (``jax.nn.relu``) on compact channels: evaluated through its primal
    program, as its traced derivative rule is tied to full-width shapes."""
    acts = [v for v in invals if isinstance(v, CompactActivation)]
    if not acts or len(acts) != len(invals):
        return NotImplemented
    region = compat.eqn_regions(eqn)[0]
    ctx.record("rewrite", eqn, acts[0].source, "custom_jvp activation evaluated through its primal "
               "on the kept channels (its custom derivative rule is not kept)")
    return Interpreter(RULES, ctx.log).run(region.jaxpr, region.consts, list(invals),
                                           ctx.path + (region.key,), ctx.regions + ("custom_jvp_call",))


def _cache_update_rule(ctx, eqn, invals):
    """``jaxpass.kv_cache_update`` of compact K/V heads into the model's own (full-width) cache:
    the kept heads go to the cache's first slots (zeros after them), where
    :func:`_cached_attention_rule` reads them. The cache keeps its size (see docs/sparsity.md)."""
    k_cache, v_cache, k, v = invals[:4]
    if not (isinstance(k, CompactActivation) and isinstance(v, CompactActivation)) or k.probe \
            or is_structured(k_cache) or is_structured(v_cache):
        return NotImplemented
    full = k_cache.shape[-2]

    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[-2] = (0, full - x.shape[-2])
        return jnp.pad(x.value, widths)

    return compat.bind_eqn(eqn, [k_cache, v_cache, pad(k), pad(v), *invals[4:]])


def _cached_attention_rule(ctx, eqn, invals):
    """``jaxpass.cached_attention`` of compact query heads over a cache whose first slots hold
    the kept KV heads (:func:`_cache_update_rule`)."""
    q, k_cache, v_cache = invals[:3]
    if not isinstance(q, CompactActivation) or q.probe or q.axis % q.ndim != q.ndim - 2 \
            or is_structured(k_cache) or is_structured(v_cache):
        return NotImplemented
    full_q = compat.aval_of(eqn.invars[0]).shape[-2]
    rep = full_q // k_cache.shape[-2]
    kept = q.shape[-2] // rep
    (out,) = compat.bind_eqn(eqn, [q.value, k_cache[..., :kept, :], v_cache[..., :kept, :],
                                   *invals[3:]])
    return [CompactActivation(out, q.tags, -2, False, q.n)]


_ATTENTION_OP = "jaxpass.causal_attention"
_CACHE_OPS = {"jaxpass.kv_cache_update": _cache_update_rule,
              "jaxpass.cached_attention": _cached_attention_rule}
RULES = Rules({"dot_general": _dot_rule, "custom_jvp_call": _custom_jvp_rule,
               "concatenate": _concatenate_rule, _ATTENTION_OP: _attention_rule, **_CACHE_OPS,
               **{p: _elementwise_rule for p in ELEMENTWISE}},
              structured_only=frozenset({"dot_general", "custom_jvp_call", "concatenate",
                                         _ATTENTION_OP, *_CACHE_OPS, *ELEMENTWISE}))
