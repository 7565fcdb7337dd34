"""Structured pruning: remove whole channels, so weights really shrink.

A *channel group* is a set of matmuls whose outputs meet only in elementwise operations and whose
result is only ever contracted by other matmuls. In a SwiGLU MLP,
``down(silu(x @ gate) * (x @ up))``, channel ``j`` of the intermediate is column ``j`` of ``gate``
and ``up`` and row ``j`` of ``down``: removing it from all three removes it from the network and
nothing else ever sees it. ``Sparsify(pattern="channels")`` finds such groups in any traced model
and keeps the most important ``1 - sparsity`` of each group's channels (per stacked layer).

How groups are found: by running the program once, abstractly, through the rewriting interpreter
with every candidate weight wrapped as a *probe*. A matmul on a probe produces a
:class:`CompactActivation` tagged with the weight's path; the elementwise rules below carry tags
through (merging them where two tagged values meet), and a matmul that contracts a tagged
activation's channel axis against a weight's input axis records that weight as a consumer.
Anything else a tagged value reaches (a reshape, a reduction, an add with the residual stream, a
program output) makes the interpreter materialize it, which the event log records with its
location: that group is not prunable, and the report says where it escaped. The analysis is the
interpreter itself, so it covers what the real rewrite covers (scans over stacked layers, nested
jits, custom_jvp activations such as ``relu``) and nothing more.

The rewrite then stores each member weight sliced (:class:`ChannelPruned`, really smaller) and
the same rules run the program on the compact activations.

Scores (per stacked layer): ``"magnitude"``: the group's squared L2 norm per channel (every
member's slice of that channel); ``"wanda"`` (Wanda-sp): ``||X_j|| * sum |W_down[j, :]|`` over
the consumers, ``X`` their calibration inputs; ``"flap"`` (An et al. 2024): the fluctuation
``Var(X_j) * ||W_down[j, :]||^2``, with compensation. ``compensate=True`` (FLAP's bias, implied by
``"flap"``) adds ``sum_{pruned j} mean(X_j) W_down[j, :]`` as a bias to each consumer's output, so
the pruned channels' average contribution is kept. (FLAP also sizes each layer's budget from
standardized scores; here every layer keeps the same count, as a stacked scan needs.)
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

import numpy as np

import jax
import jax.numpy as jnp

from jaxpass.core.interpreter import EventLog
from jaxpass.core.pass_api import PassError
from jaxpass.passes.sparsify.structured_values import (ACT_PREFIX, RULES, ChannelPruned,
                                                       PrunedVector, recording_program_outputs)


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Member:
    path: str
    axis: int             # negative: the pruned axis (output axis of a producer, input of a consumer)
    n_layer_axes: int


@dataclasses.dataclass
class Group:
    name: str
    producers: list
    consumers: list
    channels: int = 0
    vectors: list = dataclasses.field(default_factory=list)
    #: prunable units: ``channels`` for an MLP; the KV-head count for attention heads
    units: int = 0

    @property
    def is_heads(self) -> bool:
        return self.units < self.channels

    @property
    def members(self):
        """The matmul weights (what magnitude scores weigh)."""
        return self.producers + self.consumers


@dataclasses.dataclass
class Analysis:
    groups: list                      # valid groups
    rejected: list                    # (producer paths, reason)


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, items):
        items = list(items)
        if items:
            self.find(items[0])
        for b in items[1:]:
            ra, rb = self.find(items[0]), self.find(b)
            if ra != rb:
                self.parent[rb] = ra


def find_groups(program, weights: dict, vectors: dict) -> Analysis:
    """Channel groups among ``weights`` (path -> (k_axis, n_axis, n_layer_axes), negative axes)
    and per-channel ``vectors`` (path -> n_layer_axes; channels on the last axis) by one abstract
    probe run of ``program`` (see the module docstring)."""
    from jaxpass.core.manager import retrace
    from jaxpass.core.program import abstract

    probes = {p: ChannelPruned(jax.ShapeDtypeStruct(program.param(p).shape, program.param(p).dtype),
                               None, None, p, k, n, True, p)
              for p, (k, n, _) in weights.items()}
    for p in vectors:
        leaf = program.param(p)
        probes[p] = PrunedVector(jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), (p,), -1, True,
                                 leaf.shape[-1])
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: probes.get(jax.tree_util.keystr(path), x), abstract(program.params))
    log = EventLog()
    with recording_program_outputs() as outputs:
        retrace(program, RULES, params, log)

    uf = _UnionFind()
    consumed = defaultdict(set)           # consumer path -> tags it contracts
    plain_input, dense_weight, escaped = set(), {}, {}
    blocks = []                           # (tags, most aligned blocks) at each consumer
    for ev in log.events:
        if ev.kind == "rewrite" and ev.detail.startswith("probe-consumer:"):
            _, n, tags = ev.detail.split(":", 2)
            tags = tags.split("|")
            consumed[ev.param].update(tags)
            blocks.append((tags, int(n)))
            uf.union(tags)
        elif ev.kind == "rewrite" and ev.detail == "probe-plain-input":
            plain_input.add(ev.param)
        elif ev.kind in ("materialize", "boundary") and ev.param.startswith(ACT_PREFIX):
            tags = ev.param[len(ACT_PREFIX):].split("|")
            uf.union(tags)
            for t in tags:
                escaped.setdefault(t, ev.op)
        elif ev.kind in ("materialize", "boundary") and ev.param in weights:
            dense_weight.setdefault(ev.param, ev.op)
    for tags in consumed.values():   # one weight's input rows: one channel selection
        uf.union(sorted(tags))
    for t in outputs:
        uf.find(t)
        escaped.setdefault(t, "a program output")

    components = defaultdict(set)
    for t in set(uf.parent):
        components[uf.find(t)].add(t)
    groups, rejected = [], []
    for tags in components.values():
        vecs = sorted(t for t in tags if t in vectors)
        tags = sorted(t for t in tags if t in weights)
        if not tags:
            continue           # per-channel parameters that never met a matmul's output
        consumers = sorted(c for c, ts in consumed.items() if ts & set(tags))
        why = None
        for t in tags + vecs:
            if t in escaped:
                why = f"its output channels reach {escaped[t]}"
                break
            if t in dense_weight:
                why = f"the weight itself is used by {dense_weight[t]}"
                break
        if why is None and not consumers:
            why = "no matmul contracts its output channels"
        for c in consumers:
            if why is None and c in plain_input:
                why = f"the consuming weight {c} also takes full-width inputs"
            elif why is None and c in dense_weight:
                why = f"the consuming weight {c} is used by {dense_weight[c]}"
            elif why is None and c in tags:
                why = f"{c} consumes its own output channels"
        if why is None:
            layer_axes = {weights[p][2] for p in tags + consumers}
            layer_axes |= {vectors[v] for v in vecs}
            if len(layer_axes) != 1:
                why = "its weights are stacked differently (layer axes)"
        if why is not None:
            rejected.append((tags, why))
            continue
        units = math.gcd(*(n for ts, n in blocks if set(ts) & set(tags)))
        sizes = [program.param(p).shape[weights[p][1]] for p in tags]
        sizes += [program.param(c).shape[weights[c][0]] for c in consumers]
        sizes += [program.param(v).shape[-1] for v in vecs]
        if why is None and (units < 1 or any(c % units for c in sizes)):
            why = f"its channels ({sorted(set(sizes))}) do not split into {units} aligned units"
        if why is not None:
            rejected.append((tags, why))
            continue
        nl = weights[tags[0]][2]
        groups.append(Group(tags[0],
                            [Member(t, weights[t][1], nl) for t in tags],
                            [Member(c, weights[c][0], nl) for c in consumers],
                            program.param(tags[0]).shape[weights[tags[0]][1]],
                            [Member(v, -1, nl) for v in vecs], units))
    return Analysis(groups, rejected)


# --------------------------------------------------------------------------------------------
# Scores and slicing
# --------------------------------------------------------------------------------------------

def _as_layers(w, m: Member):
    """``w`` as ``[layers, channels, rest]`` (the pruned axis second)."""
    w = jnp.moveaxis(w, m.axis % w.ndim, m.n_layer_axes)
    lead = int(np.prod(w.shape[:m.n_layer_axes]))
    return w.reshape(lead, w.shape[m.n_layer_axes], -1)


def _from_layers(w3, m: Member, like_shape):
    moved = list(like_shape)
    ax = m.axis % len(like_shape)
    c = moved.pop(ax)
    moved.insert(m.n_layer_axes, c)
    moved[m.n_layer_axes] = w3.shape[1]
    return jnp.moveaxis(w3.reshape(moved), m.n_layer_axes, ax)


def magnitude_scores(program, g: Group, stats=None):
    """Per unit: the group's squared L2 norm (every member's slice of the unit's channels)."""
    return sum(unit_scores(jnp.sum(_as_layers(jnp.asarray(program.param(m.path), jnp.float32), m)
                                   ** 2, axis=-1), g.units) for m in g.members)


def wanda_scores(program, g: Group, stats):
    """Wanda-sp: ``||X_j|| * sum |W[j, :]|`` summed over the consumers and the unit's channels."""
    total = 0.0
    for m in g.consumers:
        w3 = _as_layers(jnp.asarray(program.param(m.path), jnp.float32), m)
        per_channel = jnp.sqrt(stats[m.path]["sq"]) * jnp.sum(jnp.abs(w3), axis=-1)
        total = total + unit_scores(per_channel, g.units)
    return total


def flap_scores(program, g: Group, stats):
    """FLAP's fluctuation metric: ``Var(X_j) * ||W_down[j, :]||^2`` over the consumers (with the
    mean restored by the compensation bias, the variance is what pruning a channel loses)."""
    total = 0.0
    for m in g.consumers:
        w3 = _as_layers(jnp.asarray(program.param(m.path), jnp.float32), m)
        total = total + unit_scores(stats[m.path]["var"] * jnp.sum(w3 ** 2, axis=-1), g.units)
    return total


SCORES = {"magnitude": magnitude_scores, "wanda": wanda_scores, "flap": flap_scores}


def unit_scores(channel_scores, units: int):
    """Per-channel scores ``[layers, channels]`` summed over each unit's aligned block."""
    lf, c = channel_scores.shape
    return channel_scores.reshape(lf, units, c // units).sum(-1)


def keep_indices(scores, keep: int):
    """Per layer, the ``keep`` highest-scoring units, in their original order."""
    idx = jnp.argsort(-scores, axis=-1, stable=True)[:, :keep]
    return jnp.sort(idx, axis=-1)


def channel_indices(idx, units: int, channels: int):
    """Kept unit indices ``[layers, keep]`` -> kept channel indices ``[layers, keep * size]``."""
    size = channels // units
    return (idx[:, :, None] * size + jnp.arange(size)).reshape(idx.shape[0], -1)


def slice_member(w, m: Member, idx, units: int):
    w3 = _as_layers(w, m)
    cidx = channel_indices(idx, units, w3.shape[1])
    return _from_layers(jnp.take_along_axis(w3, cidx[:, :, None], axis=1), m, w.shape)


def compensation_bias(w, m: Member, idx, mean, units: int):
    """FLAP's bias: the pruned channels' mean contribution ``sum_{pruned j} mean_j W[j, :]``,
    shaped ``[layers..., out]`` (the consumer's one output axis)."""
    w3 = _as_layers(jnp.asarray(w, jnp.float32), m)
    cidx = channel_indices(idx, units, w3.shape[1])
    pruned_mean = mean.at[jnp.arange(mean.shape[0])[:, None], cidx].set(0.0)
    b = jnp.einsum("lc,lcr->lr", pruned_mean, w3)
    return b.reshape(tuple(w.shape[:m.n_layer_axes]) + (b.shape[-1],))


# --------------------------------------------------------------------------------------------
# The pass (``Sparsify(pattern="channels")`` calls :func:`prune_channels`)
# --------------------------------------------------------------------------------------------

def _candidate(path, leaf, uses):
    """(k_axis, n_axis, n_layer_axes) of a weight used as one matrix per layer, else None."""
    contract = frozenset().union(*(u.contracting_axes for u in uses))
    free = frozenset().union(*(u.free_axes for u in uses))
    batch = frozenset().union(*(u.batch_axes for u in uses))
    if len(contract) != 1 or len(free) != 1 or batch:
        return None
    layers = sorted(set(range(leaf.ndim)) - contract - free)
    if layers != list(range(len(layers))):
        return None
    (k,), (n,) = contract, free
    return k - leaf.ndim, n - leaf.ndim, len(layers)


def _consumer_stats(program, consumers, report):
    """Per consumer: ``sq`` and ``mean`` ``[layers, channels]`` of its calibration inputs."""
    from jaxpass.core.calibration import collect_matmul_inputs

    acc: dict = {}

    def on_rows(prov, x, it):
        key = (prov.param, tuple(it[-1:]) if prov.sliced else ())
        sq, s, n = acc.get(key, (0.0, 0.0, 0))
        acc[key] = (sq + jnp.sum(x * x, axis=0), s + jnp.sum(x, axis=0), n + x.shape[0])

    n = collect_matmul_inputs(program, {m.path for m in consumers}, on_rows,
                              progress="Sparsify(channels): calibration")
    report.notes.append(f"channel scores from {n} calibration samples")
    out = {}
    for m in consumers:
        n_layers = int(np.prod(program.param(m.path).shape[:m.n_layer_axes]))
        keys = [()] if m.n_layer_axes == 0 else [(l,) for l in range(n_layers)]
        if any((m.path, k) not in acc for k in keys):
            raise PassError(f"Sparsify(pattern='channels'): no calibration activations reached "
                            f"{m.path} (every layer of it); its channels cannot be scored")
        sq = jnp.stack([acc[(m.path, k)][0] for k in keys])
        mean = jnp.stack([acc[(m.path, k)][1] / acc[(m.path, k)][2] for k in keys])
        count = jnp.asarray([acc[(m.path, k)][2] for k in keys], jnp.float32)[:, None]
        out[m.path] = dict(sq=sq, mean=mean, var=jnp.maximum(sq / count - mean ** 2, 0.0))
    return out


def prune_channels(cfg, program):
    """``Sparsify(pattern="channels", ...)``: see the module docstring. Returns a PassResult."""
    from jaxpass.core.pass_api import PassResult
    from jaxpass.core.patterns import PathRule, matmul_weights
    from jaxpass.core.report import ParamChange, PassReport
    from jaxpass.core.values import leaf_nbytes

    rule = PathRule(cfg.include, cfg.exclude)
    report = PassReport("Sparsify", cfg._config())
    if program.mode == "train":
        raise PassError("Sparsify(pattern='channels') is one-shot: the pruned weights are plain "
                        "smaller float arrays, so fine-tune them directly (jax.grad of t.apply "
                        "with respect to t.params) with transform(..., mode='inference')")
    compensate = cfg.compensate or cfg.method == "flap"
    needs_data = cfg.method != "magnitude" or compensate
    if needs_data and not program.calibration_data:
        raise PassError(f"Sparsify(pattern='channels', method={cfg.method!r}, compensate="
                        f"{compensate}) needs calibration_data (input statistics of the "
                        "consuming matmuls): transform(..., calibration_data=[(x1,), ...])")
    found = matmul_weights(program, rule, report, "Sparsify", cfg.allow_unmatched)
    weights = {}
    for path, leaf, uses in found.candidates:
        axes = _candidate(path, leaf, uses)
        if axes is None:
            report.skipped.append((path, "not one matrix per layer (one contracting and one "
                                         "output axis); not a channel-pruning candidate"))
        else:
            weights[path] = axes
    vectors = {path: leaf.ndim - 1 for path, leaf in program.param_leaves
               if path not in weights and rule.matches(path) and not program.history.get(path)
               and leaf.ndim >= 1 and leaf.shape[-1] > 1
               and jnp.issubdtype(jnp.dtype(leaf.dtype), jnp.floating)}
    analysis = find_groups(program, weights, vectors) if weights else Analysis([], [])
    for tags, why in analysis.rejected:
        report.skipped.append((", ".join(tags), f"channels not pruned: {why}"))
    heads = cfg.pattern_spec.heads
    for g in [g for g in analysis.groups if g.is_heads != heads]:
        report.skipped.append((g.name, (
            f"its {g.channels} channels move in {g.units} blocks (attention heads): "
            "pattern='heads' prunes them") if g.is_heads else (
            "an MLP-like channel group: pattern='channels' prunes it")))
    analysis = Analysis([g for g in analysis.groups if g.is_heads == heads], analysis.rejected)
    if not analysis.groups:
        seen = "; ".join(f"{t[0]}: {w}" for t, w in analysis.rejected[:4])
        kind = ("head group (query/key/value projections whose heads meet only in "
                "jaxpass.causal_attention and are only contracted by an output projection)"
                if heads else "channel group (matmuls whose outputs meet only in elementwise "
                "ops and are only contracted by other matmuls, like an MLP's)")
        raise PassError(f"Sparsify(pattern={cfg.pattern!r}): no prunable {kind} among the "
                        f"matched weights ({rule.describe()})" + (f"; e.g. {seen}" if seen else ""))

    sparsity = cfg.target_sparsity
    stats = None
    if needs_data and program.params_are_concrete:
        stats = _consumer_stats(program, [c for g in analysis.groups for c in g.consumers], report)
    plan = defaultdict(dict)       # path -> {"k"|"n": (group, member, idx)}
    for g in analysis.groups:
        keep = g.units - int(round(sparsity * g.units))
        what = "KV-head groups" if g.is_heads else "channels"
        if keep < 1:
            raise PassError(f"Sparsify(pattern={cfg.pattern!r}, sparsity={sparsity:g}) would "
                            f"remove every one of the {g.units} {what} of {g.name} (the whole "
                            "layer); use a smaller sparsity")
        idx = None
        if program.params_are_concrete:
            scores = SCORES[cfg.method](program, g, stats)
            idx = keep_indices(scores, keep)
        for m in g.producers:
            plan[m.path]["n"] = (g, m, idx, keep)
        for m in g.consumers:
            plan[m.path]["k"] = (g, m, idx, keep)
        for m in g.vectors:
            plan[m.path]["v"] = (g, m, idx, keep)
        report.matched_ops.append(
            f"{'head' if g.is_heads else 'channel'} group {g.name}: {g.units} -> {keep} {what} "
            f"per layer{' (a KV head with the query heads that read it)' if g.is_heads else ''}; "
            "producers "
            f"{[m.path for m in g.producers]}, consumers {[m.path for m in g.consumers]}"
            + (f", per-channel params {[m.path for m in g.vectors]}" if g.vectors else ""))

    replacements = {}
    for path, roles in plan.items():
        leaf = program.param(path)
        if "v" in roles:
            g, m, idx, keep = roles["v"]
            v = (jax.ShapeDtypeStruct(leaf.shape[:-1] + (keep * leaf.shape[-1] // g.units,),
                                      leaf.dtype) if idx is None
                 else slice_member(jnp.asarray(leaf), m, idx, g.units))
            replacements[path] = PrunedVector(v, (g.name,), -1, False)
            report.changed.append(ParamChange(path, f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}",
                                              replacements[path].describe(), leaf_nbytes(leaf),
                                              leaf_nbytes(replacements[path])))
            continue
        k_axis, n_axis, _ = weights[path]
        w, bias = leaf, None
        for side in ("k", "n"):
            if side not in roles:
                continue
            g, m, idx, keep = roles[side]
            kept = keep * (w.shape[m.axis] // g.units)
            if idx is None:
                shape = list(w.shape)
                shape[m.axis] = kept
                w = jax.ShapeDtypeStruct(tuple(shape), leaf.dtype)
                if side == "k" and compensate:
                    bias = jax.ShapeDtypeStruct(tuple(shape[:m.n_layer_axes]) + (shape[n_axis],),
                                                leaf.dtype)
                elif side == "n" and bias is not None:
                    bias = jax.ShapeDtypeStruct(bias.shape[:-1] + (kept,), leaf.dtype)
                continue
            if side == "k" and compensate:
                bias = compensation_bias(w, m, idx, stats[path]["mean"], g.units).astype(leaf.dtype)
            elif side == "n" and bias is not None:   # a consumer that is also a producer
                b2 = bias.reshape(idx.shape[0], -1)
                cidx = channel_indices(idx, g.units, b2.shape[1])
                bias = jnp.take_along_axis(b2, cidx, axis=1).reshape(bias.shape[:-1] + (kept,))
            w = slice_member(jnp.asarray(w), m, idx, g.units)
        value = ChannelPruned(w, bias, roles["k"][0].name if "k" in roles else None,
                              roles["n"][0].name if "n" in roles else None, k_axis, n_axis,
                              False, path)
        replacements[path] = value
        report.changed.append(ParamChange(path, f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}",
                                          value.describe(), leaf_nbytes(leaf), leaf_nbytes(value)))
    report.notes.append(f"structured: whole channels removed (weights really shrink), scored by "
                        f"{cfg.method}" + (", FLAP compensation bias on the consumers"
                                           if compensate else ""))
    return PassResult(replacements, RULES, report, tolerance=None)
