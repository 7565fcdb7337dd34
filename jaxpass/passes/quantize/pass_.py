"""``passes.Quantize``: weight quantization of the parameters that feed matmuls."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from rich.progress import track

from jaxpass.core.calibration import collect_matmul_inputs
from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_QUANTIZE, PassError, PassResult
from jaxpass.core.patterns import PathRule, matmul_weights
from jaxpass.core.report import PassReport
from jaxpass.passes.quantize.clip import search_clip
from jaxpass.passes.quantize.matmul import dot_general_rule
from jaxpass.passes.quantize.qarray import FORMATS, STORAGE_BITS, quantize
from jaxpass.passes.quantize.qat import fake_dot_general_rule, make_fake_quantized

SUPPORTED_WEIGHTS = FORMATS


@dataclasses.dataclass(frozen=True)
class Quantize:
    """Quantizes the weights of matmuls (``dot_general``, ``@``, ``einsum``).

    A parameter is a weight when it feeds a matmul operand through layout-only ops (casts,
    transposes, reshapes, slices, scan over stacked layers, ``w[i]`` in a loop). Each such weight
    is replaced in ``t.params`` by a :class:`~jaxpass.passes.quantize.qarray.QArray` (layout in
    its docstring: int4/nf4 really packed two per byte) and each matmul on it by
    ``jaxpass.quantized_dot_general``. Uses that are not matmuls (an embedding lookup on tied
    weights) read the dequantized weight; the report lists them.

    Scales are shared over the axes the weight's matmuls contract: one per output channel (and
    per layer for stacked weights) with ``group_size=None``, or one per contiguous group of
    ``group_size`` along the contracting axis. A group size that does not divide that axis is
    refused (never silently changed); so is int4/nf4 packing of an odd contracting axis.

    Args:
      weights: "int8", "int4", "nf4" (QLoRA NormalFloat-4, absmax per group), "fp8" (e4m3),
        "int3" (in a 4-bit container) or "int2" (four per byte); asymmetric is the usual choice
        below 4 bits (symmetric int2 is ternary).
      group_size: None (per output channel) or the group length along the contracting axis.
      ragged_groups: accept a ``group_size`` that does not divide the contracting axis: the last
        group is shorter (e.g. 576 = 4 x 128 + 64); scales are stored at the granularity
        ``gcd(n, group_size)`` (see ``qarray.quantize``). Off by default: such a group size is
        refused, never silently changed.
      symmetric: symmetric (no zero point); ``False`` stores zero points (int8/int4 only).
      activations: None (weight-only), "int8" or "fp8": dynamic per-token quantization of the
        matmul input (W8A8 / FP8 products); needs per-channel symmetric int8 / fp8 weights.
      activation_scales: with ``activations``: "dynamic" (one scale per token, computed at run
        time) or "static" (one step per matmul input, ``max |x| / 127`` (or ``/ 448``) over
        ``calibration_data``, per layer for stacked weights; no run-time reduction).
      method: "rtn" (round to nearest), "gptq" (int8/int4), "awq" (2-D weights) or
        "smoothquant" (with ``activations``; strength ``alpha``); all but rtn need
        ``calibration_data``.
      clip_search: search each scale's range (per output channel and group, shrink ratios 1.0
        .. 0.55; :mod:`~jaxpass.passes.quantize.clip`). With "rtn"/"gptq" the criterion is the
        weight's squared error (MSE-optimal scales; GPTQ then uses them as its static groups);
        with "awq" it is the partial output error on calibration inputs (llm-awq's
        ``auto_clip``). ``None`` (default): on for "awq" (as in the paper), off otherwise.
      alpha: SmoothQuant migration strength in [0, 1], or "auto": per weight, the alpha of
        0.3 .. 0.9 (step 0.05) whose W8A8 output error on the calibration activations is lowest.
      smooth_gptq: with "smoothquant": quantize the smoothed weights with GPTQ (Hessian of the
        smoothed activations) instead of round-to-nearest, as llm-compressor's W8A8 recipe
        (SmoothQuant, then GPTQ) does.
      include / exclude: regular expressions on parameter paths (``jax.tree_util.keystr``).
      allow_unmatched: do not raise when an ``include`` pattern matches no weight.
      outliers: dense-and-sparse quantization (SpQR / SqueezeLLM style): this fraction of each
        output channel's weights, the largest in magnitude, is kept exactly (float16, with int16
        indices) beside the quantized rest, whose scales no longer stretch to cover them.
        ``rtn`` and ``gptq`` (which leaves outliers out of its error propagation) support it.
    """

    weights: str = "int8"
    group_size: int | None = None
    symmetric: bool = True
    activations: str | None = None
    method: str = "rtn"
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    allow_unmatched: bool = False
    act_order: bool = True         # GPTQ: visit input rows by decreasing Hessian diagonal
    damp: float = 0.01             # GPTQ: damping, as a fraction of the mean Hessian diagonal
    alpha: float | str = 0.5       # SmoothQuant: migration strength, or "auto" (searched per weight)
    outliers: float = 0.0          # fraction of each output channel kept exact (dense-and-sparse)
    activation_scales: str = "dynamic"   # with activations: "dynamic" (per token) or "static"
    clip_search: bool | None = None      # range search per scale (None: on for awq only)
    ragged_groups: bool = False          # allow a group size that does not divide the axis
    smooth_gptq: bool = False            # SmoothQuant: GPTQ (not RTN) for the smoothed weights

    order: ClassVar[int] = ORDER_QUANTIZE

    def __post_init__(self):
        if self.weights not in SUPPORTED_WEIGHTS:
            raise PassError(f"Quantize(weights={self.weights!r}): supported formats are "
                            f"{SUPPORTED_WEIGHTS}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise PassError(f"Quantize(group_size={self.group_size!r}): use None (per channel) or "
                            "a positive int such as 32, 64 or 128")
        if not self.symmetric and self.weights not in ("int8", "int4", "int3", "int2"):
            raise PassError(f"Quantize(symmetric=False): zero points apply to int8/int4/int3/int2, not "
                            f"{self.weights!r}")
        if self.activations not in (None, "int8", "fp8"):
            raise PassError(f"Quantize(activations={self.activations!r}): use None (weight-only), "
                            "'int8' or 'fp8' (dynamic, one scale per token)")
        if self.activations is not None:
            want = {"int8": "int8", "fp8": "fp8"}[self.activations]
            if self.weights != want or self.group_size is not None or not self.symmetric:
                raise PassError(f"Quantize(activations={self.activations!r}) pairs with "
                                f"weights={want!r}, group_size=None, symmetric=True (integer or fp8 "
                                f"products need one weight scale per output channel); got "
                                f"weights={self.weights!r}, group_size={self.group_size}, "
                                f"symmetric={self.symmetric}")
        if self.activation_scales not in ("dynamic", "static"):
            raise PassError(f"Quantize(activation_scales={self.activation_scales!r}): use 'dynamic' "
                            "(per token at run time) or 'static' (calibrated once)")
        if self.activation_scales == "static" and self.activations is None:
            raise PassError("Quantize(activation_scales='static') calibrates activation quantization: "
                            "set activations='int8' (or 'fp8')")
        if self.method == "smoothquant" and self.activations is None:
            raise PassError("Quantize(method='smoothquant') migrates activation outliers into the "
                            "weights for W8A8: set activations='int8' (or 'fp8')")
        if self.method not in ("rtn", "gptq", "awq", "smoothquant"):
            raise PassError(f"Quantize(method={self.method!r}): implemented methods are 'rtn', "
                            "'gptq', 'awq' and 'smoothquant'")
        if not (isinstance(self.outliers, (int, float)) and 0.0 <= self.outliers < 0.5):
            raise PassError(f"Quantize(outliers={self.outliers!r}): a fraction in [0, 0.5), e.g. "
                            "0.005 keeps 0.5% of each output channel's weights exact")
        if self.outliers and (self.activations is not None or self.method not in ("rtn", "gptq")):
            raise PassError(f"Quantize(outliers={self.outliers}): dense-and-sparse outliers work with "
                            "weight-only quantization and method 'rtn' or 'gptq'; got "
                            f"activations={self.activations!r}, method={self.method!r}")
        if self.clip_search and (self.activations is not None or self.method == "smoothquant"):
            raise PassError("Quantize(clip_search=True) applies to weight-only quantization "
                            "(method 'rtn', 'gptq' or 'awq'); W8A8 weights keep their full range")
        if not (self.alpha == "auto" or (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0)):
            raise PassError(f"Quantize(alpha={self.alpha!r}): SmoothQuant's migration strength is a "
                            "number in [0, 1] (0.5 is the paper's default) or 'auto'")
        if self.smooth_gptq and self.method != "smoothquant":
            raise PassError(f"Quantize(smooth_gptq=True) refines SmoothQuant's weights; it needs "
                            f"method='smoothquant' (got {self.method!r}; use method='gptq' alone)")
        if self.method == "gptq" and self.weights not in ("int8", "int4", "int3", "int2"):
            raise PassError(f"Quantize(method='gptq'): GPTQ applies to integer formats, not {self.weights!r}")

    def _config(self) -> str:
        gran = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        parts = [f"weights={self.weights!r}", gran, "symmetric" if self.symmetric else "asymmetric",
                 f"method={self.method!r}"]
        if self._clip_by_weight_error():
            parts.append("clip_search")
        rule = PathRule(self.include, self.exclude)
        return ", ".join(parts + [rule.describe()])

    def run(self, program) -> PassResult:
        rule = PathRule(self.include, self.exclude)
        report = PassReport("Quantize", self._config())
        found = matmul_weights(program, rule, report, "Quantize", self.allow_unmatched)
        uses_by_param = found.uses_by_param

        training = program.mode == "train"
        if training and self.method != "rtn":
            raise PassError(f"Quantize(method={self.method!r}) with mode='train': quantization-aware "
                            "training fake-quantizes with round-to-nearest grids recomputed every "
                            "step; train with method='rtn', then t.finalize(params, passes=[Quantize("
                            f"..., method={self.method!r})], calibration_data=...) to calibrate the "
                            "trained weights")
        replacements = {}
        for path, leaf, uses in found.candidates:
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
            self._check_shape(path, leaf, tuple(sorted(reduce_axes)))
            if training:
                replacements[path] = make_fake_quantized(leaf, tuple(sorted(reduce_axes)), path,
                                                         self.weights, self.group_size, self.symmetric)
                continue
            replacements[path] = _make(leaf, tuple(sorted(reduce_axes)), path, self.weights,
                                       self.group_size, self.symmetric,
                                       self._outlier_count(path, leaf, reduce_axes),
                                       clip=self._clip_by_weight_error())

        if not replacements:
            raise PassError(self._nothing_matched(program, rule, uses_by_param))
        if self._clip_by_weight_error() and not training:
            grid = "1.0..0.81 (step 0.01)" if self.weights in ("int8", "fp8") else "1.0..0.55 (step 0.05)"
            report.notes.append(f"clip_search: each scale's range shrunk by the ratio in {grid} "
                                "with the lowest squared weight error")
        if training:
            rule = functools.partial(fake_dot_general_rule, activations=self.activations)
            rules = Rules({"dot_general": rule}, structured_only=frozenset({"dot_general"}))
            report.notes.append("mode='train': weights are float masters seen through the quantizer "
                                "with straight-through gradients; t.finalize(params) quantizes them")
            return PassResult(replacements, rules, report, tolerance=5e-2)
        if self.method == "gptq":
            replacements = self._gptq(program, replacements, uses_by_param, report)
        elif self.method == "awq":
            replacements = self._awq(program, replacements, uses_by_param, report)
        elif self.method == "smoothquant":
            replacements = self._smoothquant(program, replacements, uses_by_param, report)
        if self.activation_scales == "static":
            replacements = self._static_activation_scales(program, replacements, uses_by_param, report)
        rule = functools.partial(dot_general_rule, activations=self.activations)
        rules = Rules({"dot_general": rule}, structured_only=frozenset({"dot_general"}))
        return PassResult(replacements, rules, report, tolerance=5e-2)

    def _clip_by_weight_error(self) -> bool:
        """Clip search on the weight error (rtn/gptq with clip_search=True); AWQ clips on its own
        calibration criterion instead."""
        return bool(self.clip_search) and self.method in ("rtn", "gptq")

    def _single_axis_targets(self, rtn, uses_by_param, report, method, ndim=None) -> dict:
        targets = {}
        for path, q in rtn.items():
            axes = {a for u in uses_by_param[path] for a in u.contracting_axes}
            if len(axes) != 1:
                report.notes.append(f"{path}: {method} needs one contracting axis; kept round-to-nearest")
            elif ndim is not None and q.ndim != ndim:
                report.notes.append(f"{path}: {method} takes {ndim}-D weights here; kept round-to-nearest")
            else:
                targets[path] = axes.pop()
        return targets

    def _calibrated_targets(self, program, rtn, uses_by_param, report, method, ndim=None):
        """The weights a calibration method applies to, or None for an abstract transform
        (e.g. ``jaxpass.load``: shapes only, the round-to-nearest structure is kept)."""
        if not program.params_are_concrete:
            return None
        if not program.calibration_data:
            raise PassError(f"Quantize(method={self.method!r}) needs calibration data: "
                            "transform(..., calibration_data=[(x1,), (x2,), ...])")
        return self._single_axis_targets(rtn, uses_by_param, report, method, ndim=ndim)

    def _awq(self, program, rtn: dict, uses_by_param, report) -> dict:
        from jaxpass.passes.quantize.awq import awq_quantize

        targets = self._calibrated_targets(program, rtn, uses_by_param, report, "AWQ", ndim=2)
        if targets is None:
            return rtn
        stats: dict = {}
        max_rows = 512
        data = program.calibration_data
        n_calib = max(1, len(data)) if hasattr(data, "__len__") else 16

        def on_rows(prov, x, it):
            # A strided subsample of every calibration sequence (as llm-awq samples tokens
            # across the batch), not only the first sequence's leading tokens.
            abs_sum, n, rows = stats.get(prov.param, (0.0, 0, []))
            step = max(1, -(-x.shape[0] * n_calib // max_rows))
            rows = rows + [x[::step]]
            stats[prov.param] = (abs_sum + jnp.sum(jnp.abs(x), 0), n + x.shape[0], rows)

        n = collect_matmul_inputs(program, targets, on_rows, progress="AWQ: calibration")
        out, alphas = dict(rtn), []
        for path, k_axis in track(list(targets.items()), description="AWQ: scale search", transient=True):
            if path not in stats:
                report.notes.append(f"{path}: no activations reached it; kept round-to-nearest")
                continue
            abs_sum, cnt, rows = stats[path]
            out[path], alpha = awq_quantize(program.param(path), jnp.concatenate(rows)[:max_rows],
                                            abs_sum / cnt, k_axis, fmt=self.weights,
                                            group_size=self.group_size, symmetric=self.symmetric,
                                            source=path, clip=self.clip_search is not False)
            alphas.append(alpha)
        report.notes.append(f"AWQ: clip search {'on' if self.clip_search is not False else 'off'}")
        report.notes.append(f"AWQ: {n} calibration samples; alpha per weight: mean "
                            f"{np.mean(alphas):.2f}, range [{min(alphas):.2f}, {max(alphas):.2f}]"
                            if alphas else "AWQ: no weight calibrated")
        return out

    def _smoothquant(self, program, rtn: dict, uses_by_param, report) -> dict:
        from jaxpass.passes.quantize.smoothquant import search_alpha, smooth_quantize

        targets = self._calibrated_targets(program, rtn, uses_by_param, report, "SmoothQuant", ndim=2)
        if targets is None:
            return rtn
        amax: dict = {}
        rows: dict = {}
        hess: dict = {}
        auto = self.alpha == "auto"
        data = program.calibration_data
        n_calib = max(1, len(data)) if hasattr(data, "__len__") else 16

        def on_rows(prov, x, it):
            m = jnp.max(jnp.abs(x), 0)
            amax[prov.param] = m if prov.param not in amax else jnp.maximum(amax[prov.param], m)
            if auto:   # a strided subsample of every sequence, ~512 rows in all
                rows.setdefault(prov.param, []).append(x[::max(1, -(-x.shape[0] * n_calib // 512))])
            if self.smooth_gptq:
                h, c = hess.get(prov.param, (0.0, 0))
                hess[prov.param] = (h + x.T @ x, c + x.shape[0])

        n = collect_matmul_inputs(program, targets, on_rows, progress="SmoothQuant: calibration")
        out = dict(rtn)
        alphas = []
        for path, k_axis in targets.items():
            if path in amax:
                alpha = self.alpha
                if auto:
                    alpha = search_alpha(program.param(path), jnp.concatenate(rows[path]), amax[path],
                                         k_axis, fmt=self.weights, activations=self.activations)
                    alphas.append(alpha)
                out[path] = smooth_quantize(program.param(path), amax[path], k_axis, alpha=alpha,
                                            fmt=self.weights, source=path)
                if self.smooth_gptq:
                    out[path] = _smoothed_gptq(program.param(path), out[path], hess[path], k_axis,
                                               self.act_order, self.damp)
        if self.smooth_gptq:
            report.notes.append("SmoothQuant: smoothed weights quantized with GPTQ (Hessians of the "
                                "smoothed activations x / s)")
        if auto and alphas:
            report.notes.append(f"SmoothQuant: alpha searched per weight on {n} samples: mean "
                                f"{np.mean(alphas):.2f}, range [{min(alphas):.2f}, {max(alphas):.2f}]")
        else:
            report.notes.append(f"SmoothQuant: alpha={self.alpha}, activation maxima from {n} samples")
        return out

    def _static_activation_scales(self, program, qs: dict, uses_by_param, report) -> dict:
        """One calibrated activation step per quantized weight (per layer when stacked)."""
        if not program.params_are_concrete:   # abstract transform (jaxpass.load): shapes only
            return {p: dataclasses.replace(q, act_scale=jnp.ones(
                (q.shape[0],) + (1,) * (q.ndim - 1) if any(u.prov.sliced for u in uses_by_param[p])
                else (1,) * q.ndim,
                jnp.float32)) for p, q in qs.items()}
        if not program.calibration_data:
            raise PassError("Quantize(activation_scales='static') needs calibration data: "
                            "transform(..., calibration_data=[(x1,), (x2,), ...])")
        targets = self._single_axis_targets(qs, uses_by_param, report, "static activation scales")
        amax: dict = {}

        def on_rows(prov, x, it):
            key = (prov.param, tuple(it[-1:]) if prov.sliced else ())
            q = qs[prov.param]
            if q.in_scale is not None:   # SmoothQuant / AWQ: the matmul sees x * in_scale
                x = x * q.in_scale.reshape(-1)[None, :]
            m = jnp.max(jnp.abs(x))
            amax[key] = m if key not in amax else jnp.maximum(amax[key], m)

        n = collect_matmul_inputs(program, targets, on_rows, progress="static activation scales")
        qmax = 127.0 if self.activations == "int8" else 448.0
        out = dict(qs)
        for path, q in qs.items():
            keys = sorted(k[1] for k in amax if k[0] == path)
            if path not in targets or not keys:
                raise PassError(f"Quantize(activation_scales='static'): no calibration activation "
                                f"reached {path}; use activation_scales='dynamic' or exclude it")
            steps = jnp.stack([jnp.maximum(amax[path, k], 1e-12) / qmax for k in keys])
            if keys == [()]:
                steps = steps.reshape((1,) * q.ndim)
            else:
                steps = steps.reshape((len(keys),) + (1,) * (q.ndim - 1))
            out[path] = dataclasses.replace(q, act_scale=steps.astype(jnp.float32))
        report.notes.append(f"static activation scales from {n} calibration samples")
        return out

    def _gptq(self, program, rtn: dict, uses_by_param, report) -> dict:
        from jaxpass.passes.quantize.gptq import gptq_quantize

        targets = self._calibrated_targets(program, rtn, uses_by_param, report, "GPTQ")
        if targets is None:
            return rtn
        stats: dict = {}

        def on_rows(prov, x, it):
            key = (prov.param, tuple(it[-1:]) if prov.sliced else ())  # per layer when stacked
            h, n = stats.get(key, (0.0, 0))
            stats[key] = (h + x.T @ x, n + x.shape[0])

        n = collect_matmul_inputs(program, targets, on_rows, progress="GPTQ: calibration")
        report.notes.append(f"GPTQ: Hessians from {n} calibration samples "
                            f"(act_order={self.act_order}, damp={self.damp})")
        out = dict(rtn)
        for path, k_axis in track(list(targets.items()), description="GPTQ: quantizing", transient=True):
            hess = {key[1]: h / max(cnt, 1) for key, (h, cnt) in stats.items() if key[0] == path}
            if not hess:
                report.notes.append(f"{path}: no activations reached it; kept round-to-nearest")
                continue
            out[path] = gptq_quantize(program.param(path), hess, rtn[path], k_axis,
                                      act_order=self.act_order, damp=self.damp)
        return out

    def _check_shape(self, path, leaf, reduce_axes) -> None:
        if self.group_size is not None:
            if len(reduce_axes) != 1:
                raise PassError(f"Quantize(group_size={self.group_size}): {path} is contracted over "
                                f"axes {list(reduce_axes)} of shape {tuple(leaf.shape)}; groups need "
                                "one contracting axis (exclude it, or use group_size=None)")
            n = leaf.shape[reduce_axes[0]]
            if n % self.group_size and not self.ragged_groups:
                ok = [g for g in (32, 64, 128, 256) if n % g == 0]
                raise PassError(f"Quantize(group_size={self.group_size}): {path} has contracting "
                                f"dimension {n} (axis {reduce_axes[0]} of {tuple(leaf.shape)}), not "
                                f"divisible by {self.group_size}; group sizes that divide it: {ok}, "
                                "or pass ragged_groups=True for a shorter last group")
        per = 8 // STORAGE_BITS.get(self.weights, 8)
        if per > 1 and leaf.shape[reduce_axes[0]] % per:
            what = "an odd" if per == 2 else f"a non-multiple-of-{per}"
            raise PassError(f"Quantize(weights={self.weights!r}): {path} has {what} contracting "
                            f"dimension {leaf.shape[reduce_axes[0]]} (axis {reduce_axes[0]} of "
                            f"{tuple(leaf.shape)}); {self.weights} codes are packed {per} per byte "
                            "along it. Pad the weight or exclude it.")

    def _outlier_count(self, path, leaf, reduce_axes) -> int:
        if not self.outliers:
            return 0
        if len(reduce_axes) != 1:
            raise PassError(f"Quantize(outliers=...): {path} is contracted over axes "
                            f"{sorted(reduce_axes)}; outliers are counted along one contracting axis")
        return max(1, int(round(self.outliers * leaf.shape[min(reduce_axes)])))

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


def _smoothed_gptq(w, q, hess_count, k_axis, act_order, damp):
    """GPTQ codes for the smoothed weight ``w * s`` (``q.in_scale`` is ``1 / s``): the matmul sees
    ``x / s``, whose Hessian is ``diag(1/s) H diag(1/s)``."""
    import dataclasses as dc

    from jaxpass.passes.quantize.gptq import gptq_quantize

    h, cnt = hess_count
    inv = q.in_scale.reshape(-1)
    h_s = (h / max(cnt, 1)) * inv[:, None] * inv[None, :]
    smoothed = jnp.asarray(w, jnp.float32) / q.in_scale
    plain = dc.replace(q, in_scale=None)
    return dc.replace(gptq_quantize(smoothed, {(): h_s}, plain, k_axis, act_order=act_order,
                                    damp=damp), in_scale=q.in_scale)


def _check_finite(path, leaf) -> None:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return
    bad = int(np.size(leaf) - np.count_nonzero(np.isfinite(np.asarray(leaf, np.float32))))
    if bad:
        raise PassError(f"Quantize: parameter {path} has {bad} NaN/inf values; quantization "
                        "scales would be meaningless. Fix the weights first.")


# One compilation per (shape, format): the parameter path is attached outside the jit.
_quantize_jit = jax.jit(quantize, static_argnums=(1,),
                        static_argnames=("fmt", "group_size", "symmetric", "outliers"))


@functools.lru_cache(maxsize=4096)
def _abstract(shape, dtype, reduce_axes, fmt, group_size, symmetric, source, outliers):
    return jax.eval_shape(functools.partial(quantize, reduce_axes=reduce_axes, fmt=fmt,
                                            group_size=group_size, symmetric=symmetric, source=source,
                                            outliers=outliers),
                          jax.ShapeDtypeStruct(shape, dtype))


def _make(leaf, reduce_axes, path, fmt, group_size, symmetric, outliers=0, clip=False):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return _abstract(tuple(leaf.shape), jnp.dtype(leaf.dtype), reduce_axes, fmt, group_size,
                         symmetric, path, outliers)
    ratios = None
    if clip:
        ratios = search_clip(leaf, reduce_axes=reduce_axes, fmt=fmt, group_size=group_size,
                             symmetric=symmetric, outliers=outliers)
    q = _quantize_jit(leaf, reduce_axes, fmt=fmt, group_size=group_size, symmetric=symmetric,
                      outliers=outliers, clip=ratios)
    return dataclasses.replace(q, source=path)
