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
from jaxpass.passes.sparsify import masks
from jaxpass.passes.sparsify.sparsegpt import block_size, sparsegpt_prune
from jaxpass.passes.sparsify.values import MaskedWeight, SparseArray

METHODS = ("magnitude", "wanda", "sparsegpt")


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
        contracting axis: "2:4", "4:8", "1:4").
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
      include / exclude: regular expressions on parameter paths (``jax.tree_util.keystr``).
      allow_unmatched: do not raise when an ``include`` pattern matches no weight.
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
        if self.scope == "global" and (pat.is_nm or self.method != "magnitude"):
            raise PassError("Sparsify(scope='global') applies to method='magnitude' with "
                            f"pattern='unstructured', not method={self.method!r}, "
                            f"pattern={self.pattern!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise PassError(f"Sparsify(blocksize={self.blocksize!r}): a positive int, e.g. 128")

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
        return (f"pattern={self.pattern!r}, sparsity={self.target_sparsity:g}, "
                f"method={self.method!r}" + (f", scope={self.scope!r}" if self.scope != "layer" else "")
                + f", {rule.describe()}")

    # -- the pass --------------------------------------------------------------------------------
    def run(self, program) -> PassResult:
        rule = PathRule(self.include, self.exclude)
        report = PassReport("Sparsify", self._config())
        pat = self.pattern_spec
        if self.method in ("wanda", "sparsegpt") and not program.calibration_data:
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
            else:
                value = SparseArray(leaf if w is None else w.astype(leaf.dtype), str(pat), k_neg, path)
            replacements[path] = value
            achieved = "" if w is None else f", {masks.achieved_sparsity(w):.1%} zeros"
            report.changed.append(ParamChange(path, f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}",
                                              value.describe() + achieved, leaf_nbytes(leaf),
                                              leaf_nbytes(value)))
        if not train:
            report.notes.append("pruned weights are stored dense with zeros in place (same bytes); "
                                "Quantize keeps the zeros (symmetric formats), LowerToPallas packs them")
        rules = Rules({"dot_general": _dot_rule}, structured_only=frozenset({"dot_general"}))
        return PassResult(replacements, rules, report, tolerance=None)

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
        for path, t in track(list(todo.items()), description="SparseGPT: pruning", transient=True):
            w = jnp.asarray(program.param(path))
            keys = [()] if t.n_layer_axes == 0 else [(l,) for l in range(w.shape[0])]
            if any((path, key) not in stats for key in keys):
                report.notes.append(f"{path}: no activations reached (every layer of) it; pruned by magnitude")
                out[path] = w * self._mask(jnp.abs(w), t).astype(w.dtype)
                continue
            k_local = t.k_axis - t.n_layer_axes
            block = block_size(w.shape[t.k_axis], self.blocksize)
            layers = []
            for key in keys:
                wl = w[key] if key else w
                h, c = stats[(path, key)]
                wk = jnp.moveaxis(wl, k_local, 0)
                res = sparsegpt_prune(wk.reshape(wk.shape[0], -1), h / max(c, 1),
                                      sparsity=self.target_sparsity, n=pat.n, m=pat.m, block=block,
                                      damp=self.damp)
                layers.append(jnp.moveaxis(res.reshape(wk.shape), 0, k_local))
            out[path] = (jnp.stack(layers) if t.n_layer_axes else layers[0]).astype(w.dtype)
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
    weight feeds its masked value (with the straight-through gradient where configured)."""
    if not any(isinstance(v, (SparseArray, MaskedWeight)) for v in invals):
        return NotImplemented
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
