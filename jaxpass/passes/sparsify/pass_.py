"""``passes.Sparsify``: one-shot pruning of matmul weights (magnitude, Wanda, SparseGPT), and
masks for sparse training (``mode="train"``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence


import jax
import jax.numpy as jnp

from rich.progress import track

from jaxpass.core import compat
from jaxpass.core.calibration import collect_matmul_inputs
from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_SPARSIFY, PassError, PassResult
from jaxpass.core.patterns import PathRule, matmul_weights
from jaxpass.core.report import ParamChange, PassReport
from jaxpass.core.values import leaf_nbytes
from jaxpass.passes.quantize.matmul import dot_general_rule
from jaxpass.passes.quantize.qarray import STORAGE_BITS, QArray, quantize
from jaxpass.passes.sparsify import masks
from jaxpass.passes.sparsify.structured import prune_channels
from jaxpass.passes.sparsify.sparsegpt import prune_weight
from jaxpass.passes.sparsify.values import MaskedWeight, SparseArray

METHODS = ("magnitude", "wanda", "sparsegpt", "flap")   # "flap": pattern="channels" only
JOINT_FORMATS = ("int8", "int4", "int3", "int2")   # symmetric integer grids: 0 is code 0


@dataclasses.dataclass(frozen=True)
class _Target:
    """A weight to prune, seen as matrices: its contracting axis and leading layer axes."""

    path: str
    k_axis: int | None        # None: its matmuls contract several axes (unstructured magnitude only)
    n_layer_axes: int


@dataclasses.dataclass(frozen=True)
class Sparsify:
    """Prunes the weights of matmuls (``dot_general``, ``@``, ``einsum``).

    Weights are found as ``Quantize`` finds them (through casts, transposes, reshapes and scans
    over stacked layers). Each is replaced in ``t.params`` by a
    :class:`~jaxpass.passes.sparsify.values.SparseArray` holding the pruned weight with its zeros
    in place (same bytes; a later ``Quantize`` quantizes ``['w'].value`` and keeps the zeros), or,
    with ``transform(..., mode="train")``, by a
    :class:`~jaxpass.passes.sparsify.values.MaskedWeight` (float weight + 0/1 mask, see
    :mod:`jaxpass.passes.sparsify.training`). Stacked ``[L, ...]`` scan weights are pruned per
    layer (one threshold, one Hessian, one set of activation norms per layer).

    Args:
      pattern: "unstructured" or "N:M" (``N`` kept of every ``M`` consecutive weights along the
        contracting axis: "2:4", "4:8", "1:4"), or structured: "channels" / "heads" (below).
      sparsity: fraction of weights set to zero, in [0, 1). Default: 0.5 for unstructured,
        ``1 - N/M`` for N:M (any other value for N:M is refused).
      method: "magnitude" (smallest ``|w|``), "wanda" (smallest ``|w| * ||x||``, compared per
        output channel) or "sparsegpt" (Hessian-based mask selection and reconstruction of the
        kept weights); wanda and sparsegpt need ``calibration_data``.
      scope: magnitude only: "layer" (one threshold per weight matrix, per stacked layer) or
        "global" (one threshold over all matched weights; unstructured only).
      blocksize / damp: SparseGPT mask-selection block (rows; reduced to a power of two that
        divides the contracting dimension) and Hessian damping (fraction of its mean diagonal).
      straight_through: training only: gradients reach pruned weights (SR-STE); default True
        for N:M, False (masked gradient, for gradual magnitude pruning) for unstructured.
      quantize / group_size / symmetric: SparseGPT only, the paper's joint mode: quantize the
        kept weights during the sweep ("int8", "int4", "int3", "int2"; ``group_size`` rows per
        scale along the contracting axis, None for one per output channel), so each row's
        pruning *and* rounding error is compensated by the rows after it. The weight becomes a
        ``SparseArray`` holding the same ``QArray`` that ``[Sparsify, Quantize]`` produces (zeros
        kept as code 0); a later ``Quantize`` of it is refused. Symmetric only: an asymmetric
        grid's float zero point does not map 0 to 0, so pruned weights would not stay zero.
      include / exclude: regular expressions on parameter paths (``jax.tree_util.keystr``).
      allow_unmatched: do not raise when an ``include`` pattern matches no weight.
      compensate: ``pattern="channels"`` only (FLAP): add the pruned channels' mean
        contribution to each consuming matmul's output as a bias (needs ``calibration_data``).

    ``pattern="channels"`` (structured): whole channels of every *channel group* (matmuls whose
    outputs meet only in elementwise ops and are only contracted by other matmuls, e.g. an MLP's
    gate/up columns and down rows) are removed, so the weights really shrink; ``sparsity`` is the
    fraction of each group's channels removed, scored by "magnitude", "wanda" (Wanda-sp) or
    "flap". ``pattern="heads"``: the same for attention heads, whole KV-head groups (a KV head
    and the query heads that read it) at a time (see :mod:`jaxpass.passes.sparsify.structured`).
    """

    pattern: str = "unstructured"
    sparsity: float | None = None
    method: str = "magnitude"
    scope: str = "layer"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    allow_unmatched: bool = False
    blocksize: int = 128
    damp: float = 0.01
    straight_through: bool | None = None
    quantize: str | None = None
    group_size: int | None = None
    symmetric: bool = True
    compensate: bool = False

    order: ClassVar[int] = ORDER_SPARSIFY

    def __post_init__(self):
        pat = masks.parse_pattern(self.pattern)
        if self.sparsity is not None:
            s = self.sparsity
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 <= s < 1:
                raise PassError(f"Sparsify(sparsity={s!r}): the fraction of weights pruned must be "
                                "a number in [0, 1), e.g. 0.5")
            if pat.is_nm and abs(s - pat.sparsity) > 1e-9:
                raise PassError(f"Sparsify(sparsity={s!r}) contradicts pattern={self.pattern!r}, "
                                f"which prunes {pat.sparsity:g} of the weights; leave sparsity "
                                f"unset or pass {pat.sparsity:g}")
        if self.method not in METHODS:
            raise PassError(f"Sparsify(method={self.method!r}): implemented methods are {METHODS}")
        if self.scope not in ("layer", "global"):
            raise PassError(f"Sparsify(scope={self.scope!r}): use 'layer' or 'global'")
        if self.scope == "global" and (pat.is_nm or pat.structured or self.method != "magnitude"):
            raise PassError("Sparsify(scope='global') applies to method='magnitude' with "
                            f"pattern='unstructured', not method={self.method!r}, "
                            f"pattern={self.pattern!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise PassError(f"Sparsify(blocksize={self.blocksize!r}): a positive int, e.g. 128")
        if pat.structured and self.method not in ("magnitude", "wanda", "flap"):
            raise PassError(f"Sparsify(pattern={self.pattern!r}, method={self.method!r}): "
                            "channels and heads are scored by 'magnitude', 'wanda' (Wanda-sp) "
                            "or 'flap'")
        if self.method == "flap" and not pat.structured:
            raise PassError("Sparsify(method='flap') scores whole channels: use "
                            "pattern='channels' or 'heads'")
        if self.compensate and not pat.structured:
            raise PassError("Sparsify(compensate=True) is FLAP's bias compensation for "
                            "pattern='channels' / 'heads'; the other patterns keep every channel")
        self._check_joint()

    def _check_joint(self) -> None:
        """``quantize=`` is SparseGPT's joint mode: validate it and its companions."""
        g = self.group_size
        if self.quantize is None:
            if g is not None or self.symmetric is not True:
                raise PassError(f"Sparsify(group_size={g!r}, symmetric={self.symmetric!r}) "
                                "configure joint quantization; set quantize='int4' (or 'int8', ...)"
                                " or drop them")
            return
        if self.quantize not in JOINT_FORMATS:
            raise PassError(f"Sparsify(quantize={self.quantize!r}): joint SparseGPT quantizes to "
                            f"symmetric integer grids {JOINT_FORMATS}; for other formats use "
                            "[Sparsify(...), Quantize(weights=...)]")
        if self.method != "sparsegpt":
            raise PassError(f"Sparsify(quantize={self.quantize!r}, method={self.method!r}): joint "
                            "quantization is part of SparseGPT's error-compensating sweep; use "
                            "method='sparsegpt', or [Sparsify(method=" f"{self.method!r}), "
                            "Quantize(...)] to quantize after pruning")
        if self.symmetric is not True:
            raise PassError(f"Sparsify(quantize={self.quantize!r}, symmetric={self.symmetric!r}): "
                            "pruned weights must stay exactly zero, and an asymmetric grid (float "
                            "zero point) has no code whose value is 0; use symmetric=True")
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise PassError(f"Sparsify(group_size={g!r}): None (one scale per output channel) or "
                            "a positive int such as 64 or 128")

    # -- configuration -------------------------------------------------------------------------
    @property
    def pattern_spec(self) -> masks.Pattern:
        return masks.parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        pat = self.pattern_spec
        if pat.is_nm:
            return pat.sparsity
        return 0.5 if self.sparsity is None else float(self.sparsity)

    def _config(self) -> str:
        rule = PathRule(self.include, self.exclude)
        joint = "" if self.quantize is None else (
            f", quantize={self.quantize!r} " + ("per-channel" if self.group_size is None
                                                else f"group_size={self.group_size}"))
        return (f"pattern={self.pattern!r}, sparsity={self.target_sparsity:g}, "
                f"method={self.method!r}" + (f", scope={self.scope!r}" if self.scope != "layer" else "")
                + joint + f", {rule.describe()}")

    # -- the pass --------------------------------------------------------------------------------
    def run(self, program) -> PassResult:
        if self.pattern_spec.structured:
            return prune_channels(self, program)
        rule = PathRule(self.include, self.exclude)
        report = PassReport("Sparsify", self._config())
        pat = self.pattern_spec
        if (self.method in ("wanda", "sparsegpt") and not program.calibration_data
                and program.params_are_concrete):   # abstract (jaxpass.load): structure only
            raise PassError(f"Sparsify(method={self.method!r}) needs calibration data (activation "
                            "statistics of each weight's inputs): transform(..., "
                            "calibration_data=[(x1,), (x2,), ...])")
        found = matmul_weights(program, rule, report, "Sparsify", self.allow_unmatched)
        leaves, uses_by_param = found.leaves, found.uses_by_param

        targets: dict[str, _Target] = {}
        for path, leaf, uses in found.candidates:
            target = self._target(path, leaf, uses, report)
            if target is not None:
                targets[path] = target
                for u in uses:
                    report.matched_ops.append(f"{u.site.location()} [{path}]")

        if not targets:
            raise PassError(self._nothing_matched(program, rule, uses_by_param))
        if self.quantize is not None:
            self._check_joint_targets(program, targets, leaves)
        if not program.params_are_concrete:
            report.notes.append("abstract params: structure only, no weights pruned")
            pruned = {p: None for p in targets}
        elif self.method == "magnitude":
            pruned = self._magnitude(program, targets)
        elif self.method == "wanda":
            pruned = self._wanda(program, targets, report)
        else:
            pruned = self._sparsegpt(program, targets, report)

        train = program.mode == "train"
        replacements = {}
        for path, t in targets.items():
            leaf = leaves[path]
            w = pruned[path]
            k_neg = None if t.k_axis is None else t.k_axis - leaf.ndim
            if train:
                st = pat.is_nm if self.straight_through is None else bool(self.straight_through)
                if w is None:
                    mask = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
                    weight = leaf
                else:
                    # Pruned weights start at zero: a magnitude recompute keeps the method's
                    # mask until training grows them back (SR-STE) or a schedule re-admits them.
                    mask = (w != 0).astype(leaf.dtype)
                    weight = w.astype(leaf.dtype)
                value = MaskedWeight(weight, mask, str(pat), self.target_sparsity,
                                     -2 if k_neg is None else k_neg, leaf.ndim - t.n_layer_axes, st, path)
            elif self.quantize is not None:   # joint SparseGPT: w is the QArray (abstract: None)
                q = w if w is not None else self._abstract_qarray(leaf, t.k_axis, path)
                value = SparseArray(q, str(pat), k_neg, path)
            else:
                value = SparseArray(leaf if w is None else w.astype(leaf.dtype), str(pat), k_neg, path)
            replacements[path] = value
            if isinstance(w, QArray):
                w = w.materialize()
            achieved = "" if w is None else f", {masks.achieved_sparsity(w):.1%} zeros"
            report.changed.append(ParamChange(path, f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}",
                                              value.describe() + achieved, leaf_nbytes(leaf),
                                              leaf_nbytes(value)))
        if not train and self.quantize is None:
            report.notes.append("pruned weights are stored dense with zeros in place (same bytes); "
                                "Quantize keeps the zeros (symmetric formats), LowerToPallas packs them")
        elif not train:
            report.notes.append(f"weights stored as {self.quantize} codes with the pruned ones as code 0 "
                                "(the QArray a Quantize pass would make); no further Quantize applies")
        rules = Rules({"dot_general": _dot_rule}, structured_only=frozenset({"dot_general"}))
        return PassResult(replacements, rules, report, tolerance=None)

    def _check_joint_targets(self, program, targets, leaves) -> None:
        """Joint quantization: inference mode, and shapes its grid and packing accept."""
        if program.mode == "train":
            raise PassError(f"Sparsify(quantize={self.quantize!r}) is one-shot (inference): with "
                            "mode='train' prune with Sparsify(...) and Quantize(...) separately, "
                            "then t.finalize(params, passes=[Sparsify(..., quantize=...)], "
                            "calibration_data=...)")
        per = 8 // STORAGE_BITS.get(self.quantize, 8)
        for path, t in targets.items():
            shape = tuple(leaves[path].shape)
            k = shape[t.k_axis]
            if self.group_size is not None and k % self.group_size:
                ok = [g for g in (32, 64, 128, 256) if k % g == 0]
                raise PassError(f"Sparsify(quantize={self.quantize!r}, group_size={self.group_size}):"
                                f" {path} has contracting dimension {k} (axis {t.k_axis} of {shape}), "
                                f"not divisible by {self.group_size}; group sizes that divide it: "
                                f"{ok} (or exclude it)")
            if k % per:
                raise PassError(f"Sparsify(quantize={self.quantize!r}): {path} has contracting "
                                f"dimension {k} (axis {t.k_axis} of {shape}); {self.quantize} codes "
                                f"are packed {per} per byte along it. Exclude it.")

    def _abstract_qarray(self, leaf, k_axis, path):
        """The joint result's structure for abstract params (what Quantize would build)."""
        return jax.eval_shape(lambda w: quantize(w, (k_axis,), fmt=self.quantize,
                                                 group_size=self.group_size, source=path + ".value"),
                              jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))

    def _target(self, path, leaf, uses, report) -> _Target | None:
        contract = frozenset().union(*(u.contracting_axes for u in uses))
        if not contract:
            report.skipped.append((path, "its matmuls contract no axis of it"))
            return None
        seen = frozenset().union(*(u.contracting_axes | u.batch_axes | u.free_axes for u in uses))
        layer_axes = sorted(set(range(leaf.ndim)) - seen)
        n_layer = len(layer_axes) if layer_axes == list(range(len(layer_axes))) else 0
        if layer_axes and not n_layer:
            report.notes.append(f"{path}: indexed axes {layer_axes} are not leading; pruned as one matrix")
        k_axis = next(iter(contract)) if len(contract) == 1 else None
        if k_axis is None:
            if self.pattern_spec.is_nm or self.method != "magnitude":
                raise PassError(f"Sparsify(pattern={self.pattern!r}, method={self.method!r}): {path} "
                                f"{tuple(leaf.shape)} is contracted over axes {sorted(contract)}; "
                                "N:M groups, Wanda and SparseGPT need one contracting axis (exclude "
                                "it, or use unstructured magnitude)")
            return _Target(path, None, n_layer)
        m = self.pattern_spec.m
        if m is not None and leaf.shape[k_axis] % m:
            raise PassError(f"Sparsify(pattern={self.pattern!r}): {path} has contracting dimension "
                            f"{leaf.shape[k_axis]} (axis {k_axis} of {tuple(leaf.shape)}), not "
                            f"divisible by M={m}; exclude it or choose M dividing it")
        return _Target(path, k_axis, n_layer)

    # -- methods ---------------------------------------------------------------------------------
    def _mask(self, scores, t: _Target, group="matrix"):
        k = scores.ndim - 1 if t.k_axis is None else t.k_axis
        return masks.mask_for(scores, k, t.n_layer_axes, self.pattern_spec, self.target_sparsity, group)

    def _magnitude(self, program, targets) -> dict:
        out = {}
        if self.scope == "global":
            ws = {p: jnp.asarray(program.param(p)) for p in targets}
            thr = masks.global_threshold([jnp.abs(w) for w in ws.values()], self.target_sparsity)
            return {p: jnp.where(jnp.abs(w) > thr, w, 0) for p, w in ws.items()}
        for path, t in targets.items():
            w = jnp.asarray(program.param(path))
            out[path] = w * self._mask(jnp.abs(w), t).astype(w.dtype)
        return out

    def _single_axis(self, targets, report, method):
        ok = {}
        for p, t in targets.items():
            if t.n_layer_axes > 1:
                report.notes.append(f"{p}: {method} handles one stacked layer axis; pruned by magnitude")
            else:
                ok[p] = t
        return ok

    def _wanda(self, program, targets, report) -> dict:
        todo = self._single_axis(targets, report, "Wanda")
        out = self._magnitude(program, {p: t for p, t in targets.items() if p not in todo})
        sq: dict = {}

        def on_rows(prov, x, it):
            key = (prov.param, tuple(it[-1:]) if prov.sliced else ())
            sq[key] = sq.get(key, 0.0) + jnp.sum(x * x, axis=0)

        n = collect_matmul_inputs(program, todo, on_rows, progress="Wanda: calibration")
        report.notes.append(f"Wanda: input norms from {n} calibration samples; scores compared per "
                            "output channel" + (" (N:M: per group)" if self.pattern_spec.is_nm else ""))
        for path, t in todo.items():
            w = jnp.asarray(program.param(path))
            norm = self._layer_stat(path, t, w, sq, report)
            if norm is None:
                out[path] = w * self._mask(jnp.abs(w), t).astype(w.dtype)
                continue
            score = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(norm)
            out[path] = w * self._mask(score, t, group="row").astype(w.dtype)
        return out

    def _layer_stat(self, path, t: _Target, w, stats, report):
        """Per-input-channel statistic broadcast to ``w``'s shape (per layer when stacked)."""
        k = t.k_axis
        shape = [1] * w.ndim
        shape[k] = w.shape[k]
        if t.n_layer_axes == 0:
            if (path, ()) not in stats:
                report.notes.append(f"{path}: no activations reached it; pruned by magnitude")
                return None
            return stats[(path, ())].reshape(shape)
        layers = []
        for l in range(w.shape[0]):
            s = stats.get((path, (l,)))
            if s is None:
                report.notes.append(f"{path}: no activations for layer {l}; pruned by magnitude")
                return None
            layers.append(s.reshape(shape[1:]))
        return jnp.stack(layers)

    def _sparsegpt(self, program, targets, report) -> dict:
        todo = self._single_axis(targets, report, "SparseGPT")
        out = self._magnitude(program, {p: t for p, t in targets.items() if p not in todo})
        stats: dict = {}

        def on_rows(prov, x, it):
            key = (prov.param, tuple(it[-1:]) if prov.sliced else ())
            h, c = stats.get(key, (0.0, 0))
            stats[key] = (h + x.T @ x, c + x.shape[0])

        n = collect_matmul_inputs(program, todo, on_rows, progress="SparseGPT: calibration")
        pat = self.pattern_spec
        report.notes.append(f"SparseGPT: Hessians from {n} calibration samples (damp={self.damp})")
        if self.quantize is not None:
            report.notes.append(f"SparseGPT joint quantization: kept weights rounded to symmetric "
                                f"{self.quantize} during the sweep (scales "
                                + ("per output channel, from the starting weight" if self.group_size is None
                                   else f"per {self.group_size} rows, from the updated weights")
                                + "); pruning and rounding errors both compensated")
        for path, t in track(list(todo.items()), description="SparseGPT: pruning", transient=True):
            w = jnp.asarray(program.param(path))
            keys = [()] if t.n_layer_axes == 0 else [(l,) for l in range(w.shape[0])]
            if any((path, key) not in stats for key in keys):
                report.notes.append(f"{path}: no activations reached (every layer of) it; pruned by magnitude")
                out[path] = w * self._mask(jnp.abs(w), t).astype(w.dtype)
                continue
            hess = {key: stats[(path, key)][0] / max(stats[(path, key)][1], 1) for key in keys}
            out[path] = prune_weight(w, hess, t.k_axis, t.n_layer_axes, sparsity=self.target_sparsity,
                                     n=pat.n, m=pat.m, blocksize=self.blocksize, damp=self.damp,
                                     fmt=self.quantize, group_size=self.group_size,
                                     source=path + ".value")
        if self.quantize is not None:
            for path, w in out.items():
                if not isinstance(w, QArray):  # magnitude fallback: round to nearest after
                    report.notes.append(f"{path}: pruned by magnitude, then quantized round-to-nearest")
                    out[path] = quantize(w, (targets[path].k_axis,), fmt=self.quantize,
                                         group_size=self.group_size, source=path + ".value")
        return out

    def _nothing_matched(self, program, rule, uses_by_param) -> str:
        done = sorted(p for p in program.history if rule.matches(p))
        if done:
            return (f"Sparsify: the weights this rule matches ({done[:4]}) were already rewritten "
                    f"by {sorted({n for p in done for n in program.history[p]})}")
        if not uses_by_param:
            return "Sparsify: no parameter feeds a matmul (dot_general/einsum) in this program"
        return (f"Sparsify: the rule ({rule.describe()}) matches none of the matmul weights "
                f"{sorted(uses_by_param)[:6]}; pass allow_unmatched=True to accept this")


def _dot_rule(ctx, eqn, invals):
    """A matmul on a sparse weight: the dense (pruned) value feeds the unchanged dot_general, so
    a later pass still sees a matmul on the parameter leaf ``['w'].value``; a masked training
    weight feeds its masked value (with the straight-through gradient where configured). A
    jointly quantized sparse weight (its value a QArray) becomes the same
    ``quantized_dot_general`` that ``Quantize`` emits, so later passes treat both alike."""
    if not any(isinstance(v, (SparseArray, MaskedWeight)) for v in invals):
        return NotImplemented
    if any(isinstance(v, SparseArray) and isinstance(v.value, QArray) for v in invals):
        inner = [v.value if isinstance(v, SparseArray) and isinstance(v.value, QArray) else v
                 for v in invals]
        return dot_general_rule(ctx, eqn, inner)
    vals = []
    for v in invals:
        if isinstance(v, SparseArray):
            v = v.materialize()
        elif isinstance(v, MaskedWeight):
            v = v.materialize()
        vals.append(v)
    if any(hasattr(v, "materialize") for v in vals):
        return NotImplemented
    return compat.bind_eqn(eqn, vals)
