"""``passes.Shard``: lay parameters out over a device mesh and annotate activations.

What it does to the program:

- **parameters**: every parameter leaf gets a ``NamedSharding`` over ``mesh`` (concrete values are
  placed on the devices; abstract ones get the sharding attached, so ``jaxpass.load`` restores
  straight into it). Compressed parameters are sharded *consistently*: the codes, scales, zero
  points and masks of one weight follow the same logical axes (see
  :func:`jaxpass.sharding.rules.leaf_specs`: scales follow the sharded axis, groups and packed
  int4 bytes are never cut by a shard boundary);
- **activations**: the output of every matmul on a sharded weight is annotated with the layout the
  preset intends (batch over the data axes; Megatron column-parallel outputs sharded over
  ``"tensor"``, row-parallel outputs replicated over it), and the models' attention / KV-cache ops
  (:mod:`jaxpass.models.attention`) by batch and heads. On a mesh with *auto* axes the annotation
  is ``jax.lax.with_sharding_constraint``; on *explicit* axes it is ``jax.sharding.reshard``.
  Annotations change layouts, never values.

The report lists every parameter's sharding (``t.report[i].changed``), the parameters a preset
could not shard as asked (and why), and the annotated ops.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, ClassVar, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from jaxpass.core import compat
from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_SHARD, PassError, PassResult
from jaxpass.core.patterns import PathRule, named_ops, param_dots
from jaxpass.core.report import ParamChange, PassReport
from jaxpass.core.values import is_structured, leaf_nbytes, reshape_groups
from jaxpass.sharding import presets as presets_mod
from jaxpass.sharding.mesh import axis_sizes, is_explicit, mesh_from_state, mesh_state
from jaxpass.sharding.place import place
from jaxpass.sharding.rules import (LogicalRules, PathRules, as_entries, check_axes, describe, fit,
                                    leaf_specs, normalize, shards, to_partition_spec)

_QDOT = "jaxpass.quantized_dot_general"
_ATTENTION_OPS = {"jaxpass.kv_cache_update": ("batch", None, "kv_heads", None),
                  "jaxpass.cached_attention": ("batch", None, "heads", None),
                  "jaxpass.causal_attention": ("batch", None, "heads", None)}


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shards params over ``mesh`` by a preset and/or rules, and annotates activations.

    Args:
      mesh: a ``jax.sharding.Mesh`` (auto or explicit axes) whose axis names the preset uses:
        ``"data"``, ``"fsdp"``, ``"tensor"`` (:func:`jaxpass.sharding.make_mesh` builds one).
      preset: "dp", "fsdp", "tp", "fsdp+tp" (see :mod:`jaxpass.sharding.presets`) or None (only
        ``rules``; parameters no rule matches are replicated).
      rules: path rules ``[(regex, spec), ...]``, taking precedence over the preset; spec entries
        are mesh axis names or logical names (resolved by the preset's and
        ``logical_axis_rules``). A rule that matches no parameter is an error unless
        ``allow_unmatched``; two rules matching one parameter with different specs conflict.
      logical_axis_rules: ``[(logical_name, mesh_axes), ...]`` overriding the preset's mapping
        (e.g. ``[("vocab", None)]`` to keep embeddings unsharded over ``"tensor"``).
      include / exclude: regexes on parameter paths; parameters left out are replicated.
      annotate_activations: add the activation layout annotations (default True).
    """

    mesh: Mesh
    preset: str | None = "fsdp"
    rules: Any = None
    logical_axis_rules: Any = None
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    annotate_activations: bool = True
    allow_unmatched: bool = False

    order: ClassVar[int] = ORDER_SHARD

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise PassError(f"Shard(mesh=...): expected a jax.sharding.Mesh, got {type(self.mesh).__name__} "
                            "(build one with jaxpass.sharding.make_mesh({'fsdp': n}))")
        if self.preset is None and self.rules is None:
            raise PassError("Shard: give a preset ('dp', 'fsdp', 'tp', 'fsdp+tp') or rules")
        logical = self._logical()   # validates preset, logical rules and mesh axes now
        if self.rules is not None:
            sizes = axis_sizes(self.mesh)
            for pattern, spec in PathRules.make(self.rules).rules:
                where = f"Shard rule {pattern!r}"
                check_axes(logical.resolve(normalize(spec), where, sizes), sizes, where)

    # Meshes hold Device objects, which do not pickle; passes are stored in checkpoints.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["mesh"] = mesh_state(self.mesh)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["mesh"] = mesh_from_state(state["mesh"])
        self.__dict__.update(state)

    def __repr__(self):
        sizes = axis_sizes(self.mesh)
        kind = "explicit" if is_explicit(self.mesh) else "auto"
        parts = [f"mesh={sizes} ({kind})", f"preset={self.preset!r}"]
        for k in ("rules", "logical_axis_rules", "include", "exclude"):
            if getattr(self, k) is not None:
                parts.append(f"{k}={getattr(self, k)!r}")
        return f"Shard({', '.join(parts)})"

    # -- rules ----------------------------------------------------------------------------------
    def _logical(self) -> LogicalRules:
        sizes = axis_sizes(self.mesh)
        base = LogicalRules.make(presets_mod.preset_rules(self.preset, sizes) if self.preset else [], sizes)
        if self.logical_axis_rules is not None:
            base = base.override(LogicalRules.make(self.logical_axis_rules, sizes))
        return base

    def _uses(self, program) -> dict:
        """Per parameter node: the parameter axes its matmuls contract, keep and slice."""
        uses: dict = defaultdict(lambda: {"contracting": set(), "free": set(), "sliced": set()})
        for u in param_dots(program.provenance):
            d = uses[u.param]
            d["contracting"] |= u.contracting_axes
            d["free"] |= u.free_axes
            d["sliced"] |= u.prov.sliced
        nodes = frozenset(p for p, _ in self._nodes(program))
        for site in program.provenance:   # axes a scan or loop slices, whatever the use
            for prov in site.in_provs:
                if prov is not None and prov.sliced:
                    node = prov.param if prov.param in nodes else prov.param.rsplit(".", 1)[0]
                    uses[node]["sliced"] |= prov.sliced
        for site in named_ops(program.provenance, _QDOT):
            w = site.eqn.params["weight_operand"]
            prov = site.in_provs[1]
            if prov is None:
                continue
            node = prov.param.rsplit(".", 1)[0]
            (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
            contract, batch = (rc, rb) if w == 1 else (lc, lb)
            ndim = len(prov.axes)
            d = uses[node]
            d["contracting"] |= prov.param_axes(contract)
            d["free"] |= prov.param_axes([a for a in range(ndim) if a not in contract and a not in batch])
            d["sliced"] |= prov.sliced
        return dict(uses)

    def _nodes(self, program) -> list[tuple[str, Any]]:
        """Parameter nodes: structured values whole, plain leaves outside them."""
        out = []
        for p, x in jax.tree_util.tree_flatten_with_path(program.params, is_leaf=is_structured)[0]:
            out.append((jax.tree_util.keystr(p), x))
        return out

    def _preset_spec(self, path, shape, use, logical, sizes, notes):
        names = presets_mod.logical_axes(path, tuple(shape), use)
        spec = logical.resolve(names, f"Shard: {path}", sizes)
        fitted = fit(spec, shape, sizes, f"{path}", strict=False, notes=notes)
        # FSDP: a weight whose chosen axis does not divide goes along its largest dividing axis.
        fsdp_axes = as_entries(dict(logical.table).get("embed", ()))
        if fsdp_axes and "embed" in names and not any(a in as_entries(e) for e in fitted for a in fsdp_axes):
            k = shards(fsdp_axes, sizes)
            used = {a for e in fitted for a in as_entries(e)}
            cands = [d for d in range(len(shape)) if fitted[d] is None and names[d] != "layers"
                     and shape[d] % k == 0 and shape[d] >= k and not (set(fsdp_axes) & used)]
            if cands and len(shape) >= 2:
                d = max(cands, key=lambda a: shape[a])
                fitted = tuple((fsdp_axes[0] if len(fsdp_axes) == 1 else fsdp_axes) if i == d else e
                               for i, e in enumerate(fitted))
        return fitted, names

    def run(self, program) -> PassResult:
        mesh, sizes = self.mesh, axis_sizes(self.mesh)
        logical = self._logical()
        path_rules = PathRules.make(self.rules) if self.rules is not None else None
        select = PathRule(self.include, self.exclude)
        report = PassReport("Shard", repr(self))
        nodes = self._nodes(program)
        if path_rules is not None:
            unmatched = path_rules.unmatched(p for p, _ in nodes)
            if unmatched and not self.allow_unmatched:
                raise PassError(f"Shard: rule(s) {unmatched} match no parameter path; paths look like "
                                f"{[p for p, _ in nodes][:4]}. Pass allow_unmatched=True to accept this.")
        unmatched = select.unmatched_includes(p for p, _ in nodes)
        if unmatched and not self.allow_unmatched:
            raise PassError(f"Shard: include pattern(s) {unmatched} match no parameter path")
        uses = self._uses(program)

        # 1. Decide every spec (all errors are raised here, before anything is placed).
        plan = []
        for path, x in nodes:
            shape = tuple(x.shape)
            how = "replicated"
            spec = (None,) * len(shape)
            names = None
            hit = path_rules.lookup(path) if path_rules is not None else None
            if not select.matches(path):
                how = "replicated (excluded)"
            elif hit is not None:
                raw = normalize(hit[1], len(shape), f"Shard rule {hit[0]!r} for {path} {shape}")
                spec = logical.resolve(raw, f"Shard rule {hit[0]!r} for {path}", sizes)
                spec = fit(spec, shape, sizes, f"Shard rule {hit[0]!r} for {path}", strict=True)
                how = f"rule {hit[0]!r}"
            elif self.preset is not None:
                spec, names = self._preset_spec(path, shape, uses.get(path), logical, sizes, report.notes)
                how = f"preset {self.preset!r}"
            check_axes(spec, sizes, f"Shard: {path}")
            strict = hit is not None
            if is_structured(x):
                leaves = leaf_specs(x, spec, sizes, path, strict, report.notes)
                if hasattr(x, "qvalue") and ".qvalue" in leaves:
                    spec = leaves[".qvalue"]
            else:
                leaves = {"": spec}
            plan.append((path, x, spec, names, leaves, how))

        # 2. Place.
        replacements, table = {}, {}
        for path, x, spec, names, leaves, how in plan:
            sub = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(x)[0]}
            for key, lspec in leaves.items():
                leaf = x if key == "" else sub[key]
                replacements[path + key] = place(leaf, NamedSharding(mesh, to_partition_spec(lspec)))
            table[path] = spec
            after = describe(spec)
            if is_structured(x) and len(leaves) > 1:
                after += " (" + ", ".join(f"{k.lstrip('.')} {describe(s)}" for k, s in leaves.items()) + ")"
            logical_txt = f" logical {names}" if names and any(names) else ""
            report.changed.append(ParamChange(path, _describe(x), f"{after} [{how}]{logical_txt}",
                                              leaf_nbytes(x), leaf_nbytes(x)))
        report.notes.append(f"mesh {sizes}, {'explicit' if is_explicit(mesh) else 'auto'} axes; "
                            f"logical axis rules {dict(logical.table)}")

        rules = Rules()
        if self.annotate_activations:
            rules = self._activation_rules(program, table, logical, sizes, report)
        return PassResult(replacements, rules, report, tolerance=1e-4)

    # -- activations --------------------------------------------------------------------------
    def _activation_rules(self, program, specs, logical, sizes, report) -> Rules:
        batch = as_entries(logical.get("batch"))
        weight_only = set(as_entries(logical.get("embed"))) | set(batch)
        sites = {}
        for u in param_dots(program.provenance):
            sites[u.site.path] = (u.site, u.operand, u.prov, u.param)
        for site in named_ops(program.provenance, _QDOT):
            prov = site.in_provs[1]
            if prov is not None:
                sites[site.path] = (site, site.eqn.params["weight_operand"], prov,
                                    prov.param.rsplit(".", 1)[0])
        consumers = defaultdict(list)
        for site in program.provenance:
            for v in site.eqn.invars:
                if not compat.is_literal(v):
                    consumers[(site.path[:-1], id(v))].append(site.eqn)
        table = {}
        for path, (site, w_op, prov, param) in sites.items():
            wspec = specs.get(param)
            if wspec is None or site.in_shard_map:
                continue
            out = _dot_output_spec(site.eqn, w_op, prov, wspec, batch, weight_only)
            if out is not None:
                out = _splittable(out, consumers[(path[:-1], id(site.eqn.outvars[0]))], sizes)
            explicit = is_explicit(self.mesh)
            if out is not None and (explicit or any(as_entries(e) for e in out)):
                ins = _dot_input_specs(site.eqn, w_op, prov, wspec, batch, weight_only) if explicit else None
                table[path] = (site.eqn.primitive.name, len(out), out, param, ins)
        if is_explicit(self.mesh):
            # A lookup in a sharded table (embeddings) yields activations sharded like the table;
            # under explicit axes they are resharded to the batch layout right there.
            for site in program.provenance:
                prov = site.in_provs[0] if site.in_provs else None
                if site.primitive == "gather" and prov is not None and prov.param in specs:
                    nd = len(site.eqn.outvars[0].aval.shape)
                    table[site.path] = ("gather", nd, (batch or None,) + (None,) * (nd - 1), prov.param, None)
        attn = {name: logical.resolve(ax, "Shard activations", sizes) for name, ax in _ATTENTION_OPS.items()}
        report.notes.append(f"activation annotations on {len(table)} matmul outputs and on the "
                            f"attention / KV-cache ops ({'reshard' if is_explicit(self.mesh) else 'with_sharding_constraint'})")
        handler = _Annotate(self.mesh, table, attn)
        names = {"dot_general", _QDOT, *attn} | ({"gather"} if is_explicit(self.mesh) else set())
        return Rules({n: handler for n in names})


def _describe(x) -> str:
    if is_structured(x):
        return x.describe() if hasattr(x, "describe") else x.format_name
    import jax.numpy as jnp
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _dot_output_spec(eqn, w_op, prov, wspec, batch, weight_only):
    """The intended layout of a matmul's output: the activation's leading axis over the batch
    axes, the weight's kept axes over their model-parallel mesh axes (its FSDP axes are gathered,
    not propagated)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, xb = (lc, lb) if w_op == 1 else (rc, rb)
    wc, wb = (rc, rb) if w_op == 1 else (lc, lb)
    x_ndim = len(eqn.invars[1 - w_op].aval.shape)
    w_ndim = len(eqn.invars[w_op].aval.shape)
    x_free = [d for d in range(x_ndim) if d not in xc and d not in xb]
    w_free = [d for d in range(w_ndim) if d not in wc and d not in wb]
    x_entries = [(batch if d == 0 and batch else None) for d in x_free]
    w_entries = [_model_parallel_entry(d, prov, wspec, weight_only) for d in w_free]
    lhs_free, rhs_free = (x_entries, w_entries) if w_op == 1 else (w_entries, x_entries)
    out = [None] * len(lb) + lhs_free + rhs_free
    return tuple(None if not as_entries(e) else (e[0] if isinstance(e, tuple) and len(e) == 1 else e)
                 for e in out)


def _model_parallel_entry(d, prov, wspec, weight_only):
    """The mesh axes of operand axis ``d`` of a matmul on a sharded weight: those of the parameter
    axis it comes from (``prov``), without the weight-only (FSDP) axes; None if unsharded."""
    axes = prov.axes[d] if d < len(prov.axes) else frozenset()
    if len(axes) != 1:
        return None
    (p,) = axes
    keep = tuple(a for a in as_entries(wspec[p]) if a not in weight_only) if p < len(wspec) else ()
    return keep or None


def _splittable(spec, users, sizes):
    """``spec`` without the shardings a following reshape could not keep: an output axis split
    into (heads, head_dim) with fewer heads than shards (GQA k/v projections with 3 kv heads on
    a 4-way tensor axis) stays unsharded, so heads are never cut."""
    spec = list(spec)
    for eqn in users:
        if eqn.primitive.name != "reshape":
            continue
        in_shape = tuple(eqn.invars[0].aval.shape)
        out_shape = tuple(eqn.params["new_sizes"])
        groups = reshape_groups(in_shape, out_shape) or []
        for gi, go in groups:
            for d in gi:
                k = shards(spec[d], sizes) if d < len(spec) else 1
                lead = [o for o in go if out_shape[o] != 1]
                if k > 1 and len(gi) == 1 and lead and out_shape[lead[0]] % k:
                    spec[d] = None
    return tuple(spec)


def _dot_input_specs(eqn, w_op, prov, wspec, batch, weight_only):
    """Explicit axes: the operand layouts a matmul on a sharded weight computes in. The weight
    keeps its model-parallel axes (its FSDP axes are gathered here, one weight at a time); the
    activation is batch-sharded on its leading axis and matches the weight on contracted axes."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc = (lc, rc) if w_op == 1 else (rc, lc)
    w_ndim = len(eqn.invars[w_op].aval.shape)
    x_ndim = len(eqn.invars[1 - w_op].aval.shape)
    w_spec = [_model_parallel_entry(d, prov, wspec, weight_only) for d in range(w_ndim)]
    x_spec = [None] * x_ndim
    if x_ndim and 0 not in xc and 0 not in (lb if w_op == 1 else rb) and batch:
        x_spec[0] = batch
    for xd, wd in zip(xc, wc):
        x_spec[xd] = w_spec[wd]
    return (tuple(x_spec), tuple(w_spec)) if w_op == 1 else (tuple(w_spec), tuple(x_spec))


class _Annotate:
    """The interpreter handler: binds the equation as traced, then constrains its outputs."""

    def __init__(self, mesh, table, attention):
        self.mesh, self.table, self.attention = mesh, table, attention
        self.explicit = is_explicit(mesh)
        self.sizes = axis_sizes(mesh)

    def _constrain(self, x, spec):
        spec = tuple(e if x.shape[d] % shards(e, self.sizes) == 0 else None for d, e in enumerate(spec))
        sharding = NamedSharding(self.mesh, to_partition_spec(spec))
        if self.explicit:
            return jax.sharding.reshard(x, sharding)
        return jax.lax.with_sharding_constraint(x, sharding)

    def _explicit_dot(self, eqn, invals, entry):
        """Binds a matmul on a sharded weight with both operands in their compute layouts."""
        lhs_spec, rhs_spec = entry[4]
        invals = list(invals)
        invals[0] = self._constrain(invals[0], lhs_spec)
        invals[1] = self._constrain(invals[1], rhs_spec)
        if eqn.primitive.name == "dot_general":
            out_spec = tuple(e if eqn.outvars[0].aval.shape[d] % shards(e, self.sizes) == 0 else None
                             for d, e in enumerate(entry[2]))
            p = eqn.params
            return [jax.lax.dot_general(invals[0], invals[1], p["dimension_numbers"],
                                        precision=p.get("precision"),
                                        preferred_element_type=p.get("preferred_element_type"),
                                        out_sharding=NamedSharding(self.mesh, to_partition_spec(out_spec)))]
        # The quantized matmul's body contracts without an output layout: gather the
        # contracted axes (column-parallel layouts are kept).
        (lc, rc), _ = eqn.params["dimension_numbers"]
        invals[0] = self._constrain(invals[0], tuple(None if d in lc else e for d, e in enumerate(lhs_spec)))
        rest = invals[1:]
        qspec = tuple(None if d in rc else e for d, e in enumerate(rhs_spec))
        rest = [self._constrain(a, qspec) if a.ndim == len(qspec) else a for a in rest]
        return compat.bind_eqn(eqn, [invals[0], *rest])

    def __call__(self, ctx, eqn, invals):
        if any(is_structured(v) for v in invals) or ctx.regions and any(
                r in compat.SHARD_MAP_PRIMITIVES for r in ctx.regions):
            return NotImplemented
        name = eqn.primitive.name
        if name in self.attention:
            spec = self.attention[name]
            # Heads are sharded only when the kv heads divide (grouped-query attention splits
            # the query heads into (kv_heads, group) inside the op).
            kv_heads = invals[0 if name == "jaxpass.kv_cache_update" else 1].shape[2]
            if kv_heads % shards(spec[2], self.sizes):
                spec = spec[:2] + (None,) + spec[3:]
            n_in = 4 if name == "jaxpass.kv_cache_update" else 3
            invals = [self._constrain(v, spec) if i < n_in and v.ndim == 4 else v
                      for i, v in enumerate(invals)]
            outs = compat.bind_eqn(eqn, invals)
            outs = [self._constrain(o, spec) if o.ndim == 4 else o for o in outs]
            ctx.record("rewrite", eqn, "", f"output annotated {describe(spec)} (batch, heads)")
            return outs
        entry = self.table.get(ctx.path)
        if entry is None or entry[0] != name or len(eqn.outvars[0].aval.shape) != entry[1]:
            return NotImplemented
        if self.explicit and entry[4] is not None:
            outs = self._explicit_dot(eqn, invals, entry)
        else:
            outs = compat.bind_eqn(eqn, invals)
        outs[0] = self._constrain(outs[0], entry[2])
        ctx.record("rewrite", eqn, entry[3], f"output annotated {describe(entry[2])}")
        return outs
