"""``passes.Quantize``: weight quantization of the parameters that feed matmuls."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import ClassVar, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_QUANTIZE, PassError, PassResult
from jaxpass.core.patterns import PathRule, opaque_uses, param_dots
from jaxpass.core.report import PassReport
from jaxpass.passes.quantize.matmul import dot_general_rule
from jaxpass.passes.quantize.qarray import abstract_int8, quantize_int8

SUPPORTED_WEIGHTS = ("int8",)


@dataclasses.dataclass(frozen=True)
class Quantize:
    """Quantizes the weights of matmuls (``dot_general``, ``@``, ``einsum``).

    A parameter is a weight when it feeds a matmul operand through layout-only ops (casts,
    transposes, reshapes, slices, scan over stacked layers, ``w[i]`` in a loop). Each such weight
    is replaced in ``t.params`` by a :class:`~jaxpass.passes.quantize.qarray.QArray` and each
    matmul on it by ``jaxpass.quantized_dot_general``. Uses that are not matmuls (an embedding
    lookup on tied weights) read the dequantized weight; the report lists them.

    This version implements ``weights="int8"``: symmetric round-to-nearest, one scale per output
    channel (per layer for stacked weights). Other formats raise a clear error until they land.

    Args:
      weights: the weight format.
      group_size: None for one scale per output channel.
      symmetric: symmetric quantization (no zero point).
      activations: activation quantization (None: weight-only).
      method: "rtn" (round to nearest).
      include / exclude: regular expressions on parameter paths (``jax.tree_util.keystr``).
      allow_unmatched: do not raise when an ``include`` pattern matches no weight.
    """

    weights: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    activations: str | None = None
    method: str = "rtn"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    allow_unmatched: bool = False

    order: ClassVar[int] = ORDER_QUANTIZE

    def __post_init__(self):
        if self.weights not in SUPPORTED_WEIGHTS:
            raise PassError(f"Quantize(weights={self.weights!r}): this version supports "
                            f"{SUPPORTED_WEIGHTS}; int4/nf4/fp8 are not implemented yet")
        if self.group_size is not None:
            raise PassError(f"Quantize(group_size={self.group_size}): per-group scales are not "
                            "implemented yet for int8; use group_size=None (per output channel)")
        if not self.symmetric:
            raise PassError("Quantize(symmetric=False): asymmetric int8 is not implemented yet")
        if self.activations is not None:
            raise PassError(f"Quantize(activations={self.activations!r}): activation "
                            "quantization is not implemented yet (weight-only)")
        if self.method != "rtn":
            raise PassError(f"Quantize(method={self.method!r}): only 'rtn' is implemented yet")

    def _config(self) -> str:
        parts = [f"weights={self.weights!r}", "per-channel symmetric", f"method={self.method!r}"]
        rule = PathRule(self.include, self.exclude)
        return ", ".join(parts + [rule.describe()])

    def run(self, program) -> PassResult:
        rule = PathRule(self.include, self.exclude)
        report = PassReport("Quantize", self._config())
        leaves = dict(program.param_leaves)
        uses_by_param = defaultdict(list)
        for use in param_dots(program.provenance):
            uses_by_param[use.param].append(use)
        opaque = defaultdict(list)
        for param, site in opaque_uses(program.provenance):
            opaque[param].append(site)

        unmatched = rule.unmatched_includes(leaves)
        if unmatched and not self.allow_unmatched:
            raise PassError(f"Quantize: include pattern(s) {unmatched} match no parameter path. "
                            f"Parameter paths look like {list(leaves)[:4]}. Pass "
                            "allow_unmatched=True to accept this.")

        replacements = {}
        for path, leaf in leaves.items():
            if not rule.matches(path):
                continue
            uses = uses_by_param.get(path, [])
            explicit = rule.include is not None
            if not uses:
                if explicit and opaque.get(path):
                    raise PassError(
                        f"Quantize: {path} matches {rule.describe()} but its only uses are inside "
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
            _check_finite(path, leaf)
            reduce_axes = frozenset().union(*(u.contracting_axes for u in uses))
            if len({u.contracting_axes for u in uses}) > 1:
                report.notes.append(f"{path}: matmuls contract different axes "
                                    f"{sorted(sorted(u.contracting_axes) for u in uses)}; one scale "
                                    f"is shared over axes {sorted(reduce_axes)}")
            if not reduce_axes:
                report.skipped.append((path, "its matmuls contract no axis of it"))
                continue
            for u in uses:
                report.matched_ops.append(f"{u.site.location()} [{path}]")
                if u.site.in_custom_derivative:
                    report.notes.append(f"{path}: used inside a custom derivative region; it is "
                                        "dequantized at the region boundary")
            replacements[path] = _make(leaf, tuple(sorted(reduce_axes)), path)

        if not replacements:
            raise PassError(self._nothing_matched(program, rule, uses_by_param))
        rules = Rules({"dot_general": dot_general_rule}, structured_only=frozenset({"dot_general"}))
        return PassResult(replacements, rules, report, tolerance=5e-2)

    def _nothing_matched(self, program, rule, uses_by_param) -> str:
        done = sorted(p for p in program.history if rule.matches(p))
        if done:
            return (f"Quantize: the weights this rule matches ({done[:4]}) were already rewritten "
                    f"by {sorted({n for p in done for n in program.history[p]})}; quantizing them "
                    "again is not supported (use include/exclude to give each pass its own weights)")
        consts = program.large_constants()
        if consts and not uses_by_param:
            shapes = ", ".join(f"{jnp.dtype(c.dtype).name}{list(c.shape)}" for c in consts[:4])
            return ("Quantize: the model has no parameter that feeds a matmul, but it closes over "
                    f"large arrays ({shapes}): those are constants baked into the program, not "
                    "parameters. Pass the weights in params (or as module fields) instead of "
                    "closing over them.")
        if not uses_by_param:
            return "Quantize: no parameter feeds a matmul (dot_general/einsum) in this program"
        return (f"Quantize: the rule ({rule.describe()}) matches none of the matmul weights "
                f"{sorted(uses_by_param)[:6]}; pass allow_unmatched=True to accept this")


def _check_finite(path, leaf) -> None:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return
    bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf, np.float32))))
    if bad:
        raise PassError(f"Quantize: parameter {path} has {bad} NaN/inf values; quantization "
                        "scales would be meaningless. Fix the weights first.")


_quantize_int8_jit = jax.jit(quantize_int8, static_argnums=(1,), static_argnames=("source",))


def _make(leaf, reduce_axes, path):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return abstract_int8(leaf, reduce_axes, source=path)
    return _quantize_int8_jit(leaf, reduce_axes, source=path)
