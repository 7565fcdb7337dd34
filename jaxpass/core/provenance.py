"""Parameter provenance: which parameter (and which of its axes) each value of a program is.

Models rarely feed a parameter straight into a matmul: Flax casts it to the compute dtype, a
Hugging Face model transposes it, a scan over layers slices a stacked ``[L, d, d]`` weight, a
``fori_loop`` indexes it with ``w[i]``. Provenance follows a parameter through such layout-only
equations and across region boundaries (nested jit, scan consts and xs, loop-invariant while
carries, cond branches, remat, custom_jvp/custom_vjp bodies, shard_map), so that a pass can ask
"does this ``dot_general`` operand derive from a parameter, and which parameter axes does it
contract?".

The analysis is a single forward walk over the jaxpr tree. Every equation is visited once per
call site (a jitted function called twice is analysed twice, with its own inputs), and recorded
as an :class:`EqnSite` that carries its path, its enclosing regions and its operands' provenance.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

from jaxpass.core import compat
from jaxpass.core.values import reshape_groups

# A path names an equation inside nested regions: (eqn index, region key, eqn index, ...).
EqnPath = tuple


@dataclasses.dataclass(frozen=True)
class Prov:
    """A value that is parameter ``param`` seen through layout-only equations.

    ``axes[i]`` is the set of parameter axes that value axis ``i`` is built from (empty for an
    axis a broadcast added). ``sliced`` lists parameter axes consumed by indexing (a scan over
    stacked weights slices axis 0). ``via`` lists the layout primitives passed through.
    """

    param: str
    axes: tuple
    sliced: frozenset = frozenset()
    via: tuple = ()

    @staticmethod
    def of_param(path: str, ndim: int) -> "Prov":
        return Prov(path, tuple(frozenset({i}) for i in range(ndim)))

    def with_axes(self, axes, via: str, sliced=None) -> "Prov":
        return Prov(self.param, tuple(axes), self.sliced if sliced is None else sliced,
                    self.via + (via,))

    def param_axes(self, value_axes: Sequence[int]) -> frozenset:
        out = frozenset()
        for a in value_axes:
            out |= self.axes[a]
        return out


@dataclasses.dataclass(frozen=True)
class EqnSite:
    """One equation at one call site."""

    path: EqnPath
    eqn: object
    regions: tuple          # names of the enclosing higher-order primitives, outermost first
    in_provs: tuple         # provenance of each operand (None where not a parameter)

    @property
    def primitive(self) -> str:
        return self.eqn.primitive.name

    @property
    def in_custom_derivative(self) -> bool:
        return any(r in compat.CUSTOM_DERIVATIVE_PRIMITIVES for r in self.regions)

    @property
    def in_shard_map(self) -> bool:
        return any(r in compat.SHARD_MAP_PRIMITIVES for r in self.regions)

    def location(self) -> str:
        where = compat.source_location(self.eqn)
        inside = "/".join(self.regions)
        text = self.primitive + (f" in {inside}" if inside else "")
        return text + (f" at {where}" if where else "")


def _layout_rule(eqn, prov: Prov) -> Prov | None:
    """Provenance of a layout-only equation's output, given its first operand's."""
    name = eqn.primitive.name
    p = eqn.params
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision",
                "sharding_constraint", "slice", "dynamic_slice", "optimization_barrier", "pvary",
                "mesh_cast", "reshard"):
        return prov.with_axes(prov.axes, name)
    if name == "transpose":
        return prov.with_axes([prov.axes[i] for i in p["permutation"]], name)
    if name == "squeeze":
        dims = {d % len(prov.axes) for d in p["dimensions"]}
        sliced = prov.sliced | prov.param_axes(sorted(dims))
        return prov.with_axes([a for i, a in enumerate(prov.axes) if i not in dims], name, sliced)
    if name == "broadcast_in_dim":
        out_shape = p["shape"]
        axes = [frozenset()] * len(out_shape)
        for k, d in enumerate(p["broadcast_dimensions"]):
            axes[d] = prov.axes[k]
        return prov.with_axes(axes, name)
    if name == "reshape":
        if p.get("dimensions") is not None:
            return None
        in_shape = eqn.invars[0].aval.shape
        out_shape = p["new_sizes"]
        groups = reshape_groups(in_shape, out_shape)
        if groups is None:
            return None
        axes = [frozenset()] * len(out_shape)
        for gi, go in groups:
            merged = prov.param_axes(gi)
            for o in go:
                axes[o] = merged if out_shape[o] != 1 or len(go) == 1 else frozenset()
        return prov.with_axes(axes, name)
    return None


class Provenance:
    """The provenance analysis of a closed jaxpr whose first inputs are named parameters."""

    def __init__(self, closed, input_names: Sequence[str | None]):
        jaxpr = compat.jaxpr_of(closed)
        self.sites: list[EqnSite] = []
        in_provs = []
        for v, name in zip(jaxpr.invars, list(input_names) + [None] * len(jaxpr.invars)):
            in_provs.append(Prov.of_param(name, v.aval.ndim) if name is not None else None)
        self.outputs = self._walk(jaxpr, in_provs, (), ())

    def __iter__(self) -> Iterator[EqnSite]:
        return iter(self.sites)

    def _walk(self, jaxpr, in_provs, path, regions):
        env = {}
        for v, p in zip(jaxpr.invars, in_provs):
            if p is not None:
                env[v] = p

        def read(x):
            return None if compat.is_literal(x) else env.get(x)

        for i, eqn in enumerate(jaxpr.eqns):
            ins = tuple(read(x) for x in eqn.invars)
            self.sites.append(EqnSite(path + (i,), eqn, regions, ins))
            outs = self._eqn_outputs(eqn, ins, path + (i,), regions)
            for v, p in zip(eqn.outvars, outs):
                if p is not None and not compat.is_dropvar(v):
                    env[v] = p
        return [read(v) for v in jaxpr.outvars]

    def _eqn_outputs(self, eqn, ins, path, regions):
        n_out = len(eqn.outvars)
        regs = compat.eqn_regions(eqn)
        if not regs:
            if ins and ins[0] is not None:
                out = _layout_rule(eqn, ins[0])
                if out is not None and n_out == 1:
                    return [out]
            return [None] * n_out
        name = eqn.primitive.name
        # Loop-carried inputs are parameters only if every iteration passes them through.
        invariant = None
        for r in regs:
            if r.carry_pairs:
                invariant = {ri for ri, ro in r.carry_pairs if r.jaxpr.outvars[ro] is r.jaxpr.invars[ri]}
        outs_per_region = []
        for r in regs:
            r_in = []
            for k, op in enumerate(r.operand_index):
                prov = ins[op] if op is not None else None
                if prov is not None and r.sliced[k]:
                    prov = prov.with_axes(prov.axes[1:], name, prov.sliced | prov.axes[0])
                if prov is not None and name in ("scan", "while") and invariant is not None:
                    if name == "scan":
                        nc, nk, _, _ = compat.scan_groups(eqn)
                        is_carry = nc <= k < nc + nk
                    if name == "while":
                        n_consts = eqn.params["cond_nconsts"] if r.key == "cond_jaxpr" else eqn.params["body_nconsts"]
                        is_carry = k >= n_consts
                        body_pos = eqn.params["body_nconsts"] + (k - n_consts)
                        if is_carry and body_pos not in invariant:
                            prov = None
                    elif is_carry and k not in invariant:
                        prov = None
                r_in.append(prov)
            r_out = self._walk(r.jaxpr, r_in, path + (r.key,), regions + (name,))
            outs_per_region.append((r, r_out))
        outs = [None] * n_out
        if name == "cond":
            first_r, first = outs_per_region[0]
            for j, oi in enumerate(first_r.outvar_index):
                if all(o[j] is not None and o[j] == first[j] for _, o in outs_per_region):
                    outs[oi] = first[j]
            return outs
        for r, r_out in outs_per_region:
            for j, oi in enumerate(r.outvar_index):
                if oi is None or r_out[j] is None:
                    continue
                if r.carry_pairs and not any(ro == j and r.jaxpr.outvars[ro] is r.jaxpr.invars[ri]
                                             for ri, ro in r.carry_pairs):
                    continue
                outs[oi] = r_out[j]
        return outs
