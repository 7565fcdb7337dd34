"""Sharding rules: from parameter paths or logical axis names to ``PartitionSpec``s.

Two ways to say how a parameter is laid out over a mesh (MaxText / Flax style):

- **path rules**: ``[(regex, spec), ...]``. ``regex`` is searched in the parameter's
  ``jax.tree_util.keystr`` path; ``spec`` gives one entry per parameter axis: a mesh axis name, a
  tuple of names, or None (replicated). Example: ``[(r"q_proj.*kernel", (None, "tensor"))]``.
- **logical axis rules**: ``[(logical_name, mesh_axes), ...]``, e.g. ``[("embed", "fsdp"),
  ("mlp", "tensor"), ("batch", ("data", "fsdp"))]``. When given, the entries of path-rule specs
  are *logical* names (``(r"up_proj", ("embed", "mlp"))``) resolved through them; the presets
  describe every parameter in logical names and resolve them the same way.

Errors are raised before anything is compiled: a spec naming an axis the mesh does not have, a
mesh axis used twice in one spec, a spec with the wrong number of entries, two rules that match
one parameter with different specs (conflict), a logical name given two mappings, and a mesh
axis that does not divide the dimension it shards.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from jax.sharding import PartitionSpec

from jaxpass.core.pass_api import PassError

Spec = tuple  # one entry per array axis: None | str | tuple[str, ...]


def as_entries(entry) -> tuple[str, ...]:
    """The mesh axes of one spec entry, as a tuple (``None`` -> ``()``)."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def normalize(spec, ndim: int | None = None, where: str = "spec") -> Spec:
    """A spec as a tuple of entries (None, a name, or a tuple of names), padded with None to
    ``ndim`` entries when given (a PartitionSpec may be shorter than the array's rank)."""
    if isinstance(spec, PartitionSpec):
        spec = tuple(spec)
    elif isinstance(spec, str) or spec is None:
        spec = (spec,)
    spec = tuple(None if not as_entries(e) else (e if isinstance(e, str) or len(as_entries(e)) > 1
                                                 else as_entries(e)[0]) for e in spec)
    if ndim is not None:
        if len(spec) > ndim:
            raise PassError(f"{where}: spec {spec} has {len(spec)} entries for a {ndim}-D array")
        spec = spec + (None,) * (ndim - len(spec))
    return spec


def to_partition_spec(spec: Spec) -> PartitionSpec:
    spec = list(spec)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def check_axes(spec: Spec, mesh_axes: dict[str, int], where: str) -> None:
    """Every named axis exists in the mesh and is used at most once."""
    seen = []
    for e in spec:
        for a in as_entries(e):
            if a not in mesh_axes:
                raise PassError(f"{where}: mesh axis {a!r} is not in the mesh (axes "
                                f"{dict(mesh_axes)})")
            if a in seen:
                raise PassError(f"{where}: mesh axis {a!r} is used twice in spec {spec}")
            seen.append(a)


def shards(entry, mesh_axes: dict[str, int]) -> int:
    """How many pieces a spec entry cuts its dimension into."""
    return int(np.prod([mesh_axes[a] for a in as_entries(entry)])) if as_entries(entry) else 1


def fit(spec: Spec, shape, mesh_axes, where: str, strict: bool, notes: list | None = None) -> Spec:
    """``spec`` checked against ``shape``: an entry whose mesh size does not divide its
    dimension raises (``strict``) or is dropped with a note (presets)."""
    out = []
    for d, (e, n) in enumerate(zip(spec, shape)):
        k = shards(e, mesh_axes)
        if k > 1 and n % k:
            if strict:
                raise PassError(f"{where}: mesh axes {as_entries(e)} ({k} shards) do not divide "
                                f"dimension {d} of size {n} (shape {tuple(shape)})")
            if notes is not None:
                notes.append(f"{where}: axis {d} (size {n}) not sharded over {as_entries(e)} "
                             f"({k} shards do not divide it); replicated")
            e = None
        out.append(e)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """``logical name -> mesh axes`` (Flax ``logical_axis_rules`` / MaxText style)."""

    table: tuple  # ((logical, mesh_axes), ...)

    @classmethod
    def make(cls, rules, mesh_axes: dict[str, int] | None = None) -> "LogicalRules":
        items = list(rules.items()) if isinstance(rules, dict) else [tuple(r) for r in rules]
        table = {}
        for item in items:
            if len(item) != 2 or not isinstance(item[0], str):
                raise PassError(f"logical axis rule {item!r}: expected (logical_name, mesh_axes)")
            name, axes = item[0], as_entries(item[1])
            if name in table and table[name] != axes:
                raise PassError(f"conflicting logical axis rules for {name!r}: {table[name]} and {axes}")
            if mesh_axes is not None:
                for a in axes:
                    if a not in mesh_axes:
                        raise PassError(f"logical axis rule ({name!r}, {item[1]!r}): mesh axis {a!r} "
                                        f"is not in the mesh (axes {dict(mesh_axes)})")
            table[name] = axes
        return cls(tuple(table.items()))

    def get(self, name):
        return dict(self.table).get(name, ())

    def override(self, other: "LogicalRules") -> "LogicalRules":
        merged = dict(self.table)
        merged.update(dict(other.table))
        return LogicalRules(tuple(merged.items()))

    def resolve(self, logical: Sequence, where: str, mesh_axes: dict[str, int] | None = None) -> Spec:
        """Mesh spec of a tuple of logical names (None stays None). A logical name no rule maps
        is an error unless it is itself a mesh axis name; within one spec a mesh axis is used
        by its first logical axis only (as Flax does)."""
        known = dict(self.table)
        used, out = set(), []
        for name in logical:
            if name is None:
                out.append(None)
                continue
            if name in known:
                axes = known[name]
            elif mesh_axes is not None and name in mesh_axes:
                out.append(name)       # a mesh axis named directly: a repeat is an error later
                used.add(name)
                continue
            else:
                raise PassError(f"{where}: {name!r} is neither a mesh axis (mesh axes "
                                f"{sorted(mesh_axes or {})}) nor a logical axis with a rule (logical "
                                f"axes {sorted(known)})")
            axes = tuple(a for a in axes if a not in used)
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class PathRules:
    """``[(regex, spec), ...]``; every rule must match a parameter, and a parameter matched by
    several rules must get the same spec from all of them."""

    rules: tuple

    @classmethod
    def make(cls, rules) -> "PathRules":
        items = list(rules.items()) if isinstance(rules, dict) else list(rules)
        out = []
        for item in items:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise PassError(f"sharding rule {item!r}: expected (path_regex, spec)")
            try:
                re.compile(item[0])
            except re.error as e:
                raise PassError(f"sharding rule {item[0]!r}: bad regular expression ({e})") from e
            spec = item[1]
            spec = tuple(spec) if isinstance(spec, (PartitionSpec, list, tuple)) else (spec,)
            out.append((item[0], spec))
        return cls(tuple(out))

    def lookup(self, path: str) -> tuple[str, tuple] | None:
        """The (pattern, spec) that applies to ``path``, None if no rule matches."""
        hits = [(p, s) for p, s in self.rules if re.search(p, path)]
        if not hits:
            return None
        specs = {normalize(s) for _, s in hits}
        if len(specs) > 1:
            raise PassError(f"conflicting sharding rules for {path}: "
                            + ", ".join(f"{p!r} -> {s}" for p, s in hits))
        return hits[0]

    def unmatched(self, paths) -> list[str]:
        paths = list(paths)
        return [p for p, _ in self.rules if not any(re.search(p, q) for q in paths)]


def describe(spec: Spec) -> str:
    return str(to_partition_spec(spec))


def leaf_specs(value: Any, spec: Spec, mesh_axes: dict[str, int], where: str, strict: bool,
               notes: list) -> dict[str, Spec]:
    """Specs of the array leaves of a structured value whose *logical* array gets ``spec``.

    QArray (see :mod:`jaxpass.passes.quantize.qarray`): codes follow the logical axes, except
    that the int4/nf4 packed axis is sharded only when every shard holds whole bytes (a pair of
    codes is never split: the logical size must divide by ``2 * shards``); scales and zero
    points follow a sharded axis where they are one per index, are replicated where they are
    shared (size 1), and are sharded by group where the number of groups divides by the shards
    (group boundaries coincide with shard boundaries). Otherwise the axis is not sharded at all
    (codes included): an error under ``strict``, a note for presets.

    Any other structured value (sparse pairs, training-mode masters and masks): leaves of the
    logical shape follow ``spec``; a leaf whose axis is not the logical size keeps that axis
    replicated (noted).
    """
    from jax import tree_util
    from jaxpass.passes.quantize.qarray import QArray

    shape = tuple(value.shape)
    spec = list(spec)
    if isinstance(value, QArray):
        packed = None if value.packed_axis is None else value.packed_axis % len(shape)
        sides = {f: getattr(value, f) for f in ("scale", "zero", "in_scale")
                 if getattr(value, f) is not None}
        for d, e in enumerate(spec):
            k = shards(e, mesh_axes)
            if k == 1:
                continue
            why = None
            if d == packed and shape[d] % (2 * k):
                why = (f"its 4-bit codes are packed two per byte along axis {d} (size {shape[d]}); "
                       f"{k} shards would split a byte")
            for f, a in sides.items():
                m = a.shape[d]
                if m not in (1, shape[d]) and m % k:
                    why = (f"its {f} has {m} groups along axis {d}; {k} shards would cut a group")
            if why:
                if strict:
                    raise PassError(f"{where}: cannot shard axis {d} over {as_entries(e)}: {why}")
                notes.append(f"{where}: axis {d} not sharded: {why}")
                spec[d] = None
        out = {".qvalue": tuple(spec)}
        for f, a in sides.items():
            out["." + f] = tuple(e if a.shape[d] != 1 else None for d, e in enumerate(spec))
        return out
    out = {}
    for p, leaf in tree_util.tree_flatten_with_path(value)[0]:
        key = tree_util.keystr(p)
        lshape = tuple(getattr(leaf, "shape", ()))
        if len(lshape) != len(shape):
            if any(as_entries(e) for e in spec):
                notes.append(f"{where}{key}: rank {len(lshape)} differs from the logical rank "
                             f"{len(shape)}; replicated")
            out[key] = (None,) * len(lshape)
            continue
        ls = []
        for d, e in enumerate(spec):
            if lshape[d] == shape[d] or shards(e, mesh_axes) == 1:
                ls.append(e)
            else:
                if strict and lshape[d] % shards(e, mesh_axes):
                    raise PassError(f"{where}{key}: axis {d} of size {lshape[d]} cannot be sharded "
                                    f"over {as_entries(e)}")
                notes.append(f"{where}{key}: axis {d} (size {lshape[d]}, logical {shape[d]}) "
                             "replicated: its storage layout is not one entry per index")
                ls.append(None)
        out[key] = tuple(ls)
    return out
