"""Pattern matching over a program's equations.

Passes describe what they rewrite as patterns, not as walks over jaxprs:

    uses = param_dots(program.provenance, include=r"attn", exclude=r"lm_head")
    for use in uses:
        use.param, use.contracting_axes  # parameter path; parameter axes the dot contracts

A :class:`ParamDot` is a ``dot_general`` (``jnp.dot``, ``@`` and ``einsum`` all trace to it) with
one operand that derives from a parameter through layout-only equations.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from collections import defaultdict
import re
from typing import Callable, Iterable, Sequence

from jaxpass.core.provenance import EqnSite, Prov, Provenance

DOT_PRIMITIVES = frozenset({"dot_general"})


@dataclasses.dataclass(frozen=True)
class PathRule:
    """``include`` / ``exclude`` regular expressions on parameter paths (``re.search``)."""

    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    @staticmethod
    def _patterns(x) -> tuple[str, ...]:
        if x is None:
            return ()
        return (x,) if isinstance(x, str) else tuple(x)

    def matches(self, path: str) -> bool:
        inc = self._patterns(self.include)
        exc = self._patterns(self.exclude)
        if inc and not any(re.search(p, path) for p in inc):
            return False
        return not any(re.search(p, path) for p in exc)

    def unmatched_includes(self, paths: Iterable[str]) -> list[str]:
        """Include patterns that match none of ``paths``."""
        paths = list(paths)
        return [p for p in self._patterns(self.include) if not any(re.search(p, q) for q in paths)]

    def describe(self) -> str:
        parts = []
        if self.include is not None:
            parts.append(f"include={self.include!r}")
        if self.exclude is not None:
            parts.append(f"exclude={self.exclude!r}")
        return ", ".join(parts) or "all parameters"


@dataclasses.dataclass(frozen=True)
class ParamDot:
    """A dot_general one of whose operands is (a layout view of) a parameter."""

    site: EqnSite
    operand: int                  # 0: the parameter is the lhs, 1: the rhs
    prov: Prov
    contracting_axes: frozenset   # parameter axes contracted by the dot
    batch_axes: frozenset         # parameter axes that are dot batch dimensions
    free_axes: frozenset          # parameter axes that survive into the output

    @property
    def param(self) -> str:
        return self.prov.param


def param_dots(provenance: Provenance, rule: PathRule | None = None,
               where: Callable[[EqnSite], bool] | None = None) -> list[ParamDot]:
    """All dot_generals with an operand derived from a parameter accepted by ``rule``."""
    out = []
    for site in provenance:
        if site.primitive not in DOT_PRIMITIVES:
            continue
        if where is not None and not where(site):
            continue
        (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
        for operand, (contract, batch) in enumerate(((lc, lb), (rc, rb))):
            prov = site.in_provs[operand]
            if prov is None or (rule is not None and not rule.matches(prov.param)):
                continue
            ndim = len(prov.axes)
            free = [a for a in range(ndim) if a not in contract and a not in batch]
            out.append(ParamDot(site, operand, prov, prov.param_axes(contract),
                                prov.param_axes(batch), prov.param_axes(free)))
    return out


def named_ops(provenance: Provenance, name: str) -> list[EqnSite]:
    """All equations of the jaxpass named op ``name`` (see :mod:`jaxpass.core.ops`)."""
    full = name if name.startswith("jaxpass.") else "jaxpass." + name
    return [s for s in provenance if s.primitive == full]


def opaque_uses(provenance: Provenance) -> list[tuple[str, EqnSite]]:
    """(parameter path, site) for parameters that enter an op jaxpass cannot look into: a kernel
    (pallas_call, custom_call) or a higher-order primitive whose regions compat does not know."""
    from jaxpass.core import compat

    out = []
    for site in provenance:
        opaque = site.primitive in compat.OPAQUE_KERNEL_PRIMITIVES or (
            compat.has_subjaxprs(site.eqn) and not compat.eqn_regions(site.eqn))
        if opaque:
            out.extend((p.param, site) for p in site.in_provs if p is not None)
    return out


@dataclasses.dataclass(frozen=True)
class MatmulWeights:
    """What a weight-rewriting pass (Quantize, Sparsify) starts from: see :func:`matmul_weights`."""

    leaves: dict                # every parameter path -> array
    uses_by_param: dict         # path -> [ParamDot, ...]
    candidates: list            # [(path, leaf, uses)]: float weights of matmuls, accepted by the rule


def matmul_weights(program, rule: PathRule, report, pass_name: str,
                   allow_unmatched: bool = False) -> MatmulWeights:
    """The float parameters accepted by ``rule`` that feed matmuls, with their matmul uses.

    Why one function: every weight pass must refuse the same things the same way. An include
    pattern that matches no path raises (unless ``allow_unmatched``); an explicitly included
    weight whose only uses are inside an op jaxpass cannot rewrite raises; weights with no matmul
    use, already rewritten by an earlier pass, or not floating point are left, each with its
    reason in ``report.skipped``.
    """
    from jaxpass.core.pass_api import PassError

    leaves = dict(program.param_leaves)
    uses_by_param = defaultdict(list)
    for use in param_dots(program.provenance):
        uses_by_param[use.param].append(use)
    opaque = defaultdict(list)
    for param, site in opaque_uses(program.provenance):
        opaque[param].append(site)
    unmatched = rule.unmatched_includes(leaves)
    if unmatched and not allow_unmatched:
        raise PassError(f"{pass_name}: include pattern(s) {unmatched} match no parameter path. "
                        f"Parameter paths look like {list(leaves)[:4]}. Pass "
                        "allow_unmatched=True to accept this.")
    explicit = rule.include is not None
    candidates = []
    for path, leaf in leaves.items():
        if not rule.matches(path):
            continue
        uses = uses_by_param.get(path, [])
        if not uses:
            if explicit and opaque.get(path):
                raise PassError(
                    f"{pass_name}: {path} matches {rule.describe()} but its only uses are inside "
                    f"{opaque[path][0].location()}, an op whose body jaxpass cannot rewrite; "
                    "exclude it, or expose the matmul outside that op")
            if explicit and leaf.ndim >= 1:
                report.skipped.append((path, "not used by a matmul"))
            continue
        if program.history.get(path):
            report.skipped.append((path, f"already rewritten by {program.history[path]}"))
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            report.skipped.append((path, f"dtype {jnp.dtype(leaf.dtype).name} is not float"))
            continue
        candidates.append((path, leaf, uses))
    return MatmulWeights(leaves, uses_by_param, candidates)
