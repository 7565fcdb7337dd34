"""``passes.LowerToPallas``: send the quantized matmuls that Quantize inserted to Pallas kernels.

It finds ``jaxpass.quantized_dot_general`` equations whose weight is a parameter (a QArray made
by an earlier ``Quantize``) used as a plain ``x[..., K] @ W[K, N]`` (or ``x @ W.T`` of a
``[N, K]`` weight). For each such weight it

1. pre-packs it once, at transform time, into the kernels' layout
   (:mod:`jaxpass.kernels_pallas.quantized_matmul.layout`): the QArray in ``t.params`` becomes a
   :class:`PackedLinear`;
2. rewrites each matmul on it into ``quantized_matmul``, whose dispatcher picks the kernel and tile
   configuration per (M, K, N, format) from the autotuned table, or XLA where XLA is faster or the
   kernel does not apply (CPU, shapes, formats).

Everything it does not lower (nf4 / fp8 weights, batched or multi-axis contractions, weights also
used by other ops, stacked scan weights in this version) stays on XLA, and the report says why,
per weight and per matmul shape.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp

from jaxpass.core.interpreter import Rules
from jaxpass.core.pass_api import ORDER_LOWER, PassError, PassResult
from jaxpass.core.patterns import PathRule
from jaxpass.core.report import PassReport
from jaxpass.core.values import LAYOUT_PRIMITIVES, ComponentView, StructuredValue
from jaxpass.passes.quantize.qarray import QArray, pack_nibbles

LOWERABLE_FORMATS = ("int8", "int4")
OP = "jaxpass.quantized_dot_general"


@dataclasses.dataclass
class PackedLinear(StructuredValue):
    """A QArray weight pre-packed for the quantized-matmul kernels.

    ``packed`` is the kernels' :class:`PackedWeight` (logical ``[K, N]``). The static fields
    remember the QArray it came from, so :meth:`component` rebuilds any of its old leaves
    exactly (for equations that still read them).
    """

    packed: object
    transposed: bool = False        # the value stands for W.T ([N, K]), e.g. a torch-layout param
    code_shift: int = 0             # asymmetric int8 codes are stored shifted by -128
    qarray_meta: tuple = ()         # (dtype, fmt, packed_axis, source)

    @property
    def source(self) -> str:
        return self.qarray_meta[3]

    @property
    def format_name(self) -> str:
        return f"packed-{self.qarray_meta[1]}"

    @property
    def shape(self):
        k, n = self.packed.k, self.packed.n
        return (n, k) if self.transposed else (k, n)

    @property
    def dtype(self):
        return self.qarray_meta[0]

    def describe(self) -> str:
        return f"{self.packed.format} packed for the quantized-matmul kernels ({self.packed.nbytes} B)"

    def to_qarray(self) -> QArray:
        """The QArray this value stands for (in its current orientation), rebuilt exactly."""
        from jaxpass.kernels_pallas.quantized_matmul.layout import unpack

        dtype, fmt, packed, source = self.qarray_meta
        q, scales, zeros = unpack(self.packed)          # [K, N], [G, N], [G, N] | None
        if self.code_shift:
            q = (q.astype(jnp.int32) + self.code_shift).astype(jnp.uint8)
            zeros = zeros + self.code_shift
        out = QArray(q, scales, zeros, dtype, fmt, None, source)
        if packed:
            out = dataclasses.replace(out, qvalue=pack_nibbles(q, 0), packed_axis=-2)  # along K
        if self.transposed:
            out = out.apply_layout("transpose", {"permutation": (1, 0)})
        return out

    def apply_layout(self, name, params, *index_operands):
        if name == "transpose" and tuple(params["permutation"]) == (1, 0):
            return dataclasses.replace(self, transposed=not self.transposed)
        if name == "convert_element_type" and jnp.issubdtype(params["new_dtype"], jnp.floating):
            dtype, fmt, packed, source = self.qarray_meta
            return dataclasses.replace(self, qarray_meta=(jnp.dtype(params["new_dtype"]), fmt, packed, source))
        return None

    def same_weight(self, other) -> bool:
        return (isinstance(other, PackedLinear) and other.transposed == self.transposed
                and all(a is b for a, b in zip(jax.tree_util.tree_leaves(self.packed),
                                               jax.tree_util.tree_leaves(other.packed))))

    def component(self, name: str):
        q = self.to_qarray()
        return {".qvalue": q.qvalue, ".scale": q.scale, ".zero": q.zero}[name]

    def materialize(self):
        return self.to_qarray().materialize()


jax.tree_util.register_dataclass(PackedLinear, data_fields=["packed"],
                                 meta_fields=["transposed", "code_shift", "qarray_meta"])


def _pack(q: QArray, k_axis: int) -> PackedLinear:
    from jaxpass.kernels_pallas.quantized_matmul.layout import pack

    transposed = k_axis == 1
    codes, scale, zero = q.codes(), q.scale, q.zero
    if transposed:
        codes, scale = codes.T, scale.T
        zero = None if zero is None else zero.T
    shift = 0
    if q.fmt == "int8" and zero is not None:  # uint8 codes in [0, 255]: shift into int8 range
        shift = 128
        codes = (codes.astype(jnp.int32) - shift).astype(jnp.int8)
        zero = zero - shift
    k = codes.shape[0]
    groups = scale.shape[0]
    packed = pack(codes.astype(jnp.int8), scale, zero, bits=q.bits, group_size=k // groups)
    return PackedLinear(packed, transposed, shift, (q.dtype, q.fmt, q.packed_axis is not None, q.source))


def _lowerable(site, q: QArray) -> str | None:
    """Why this quantized matmul cannot use the kernels, or None if it can."""
    p = site.eqn.params
    if p.get("activations") is not None:
        return f"{p['activations']} activation quantization (W8A8) is not lowered in this version"
    if q.fmt not in LOWERABLE_FORMATS:
        return f"format {q.fmt} has no kernel (kernels take {LOWERABLE_FORMATS})"
    if q.in_scale is not None:
        return "AWQ input scales are not lowered in this version"
    if q.outlier_idx is not None:
        return "dense-and-sparse outliers are not lowered in this version"
    if p["weight_operand"] != 1:
        return "the weight is the left operand"
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb:
        return "batched matmul"
    if len(rc) != 1 or q.ndim != 2:
        return f"weight of rank {q.ndim} contracted over {len(rc)} axes (kernels take 2-D weights)"
    x_ndim = site.eqn.invars[0].aval.ndim
    if tuple(lc) != (x_ndim - 1,):
        return "activation not contracted over its last axis"
    if not jnp.issubdtype(site.eqn.invars[0].aval.dtype, jnp.floating):
        return "integer activations"
    return None


@dataclasses.dataclass(frozen=True)
class LowerToPallas:
    """Replaces quantized matmuls by Pallas kernels where backend and shapes allow.

    Args:
      backend: "auto" (tuned table / platform decides per shape), "triton", "mosaic_tpu", "xla".
      interpret: run Pallas kernels in the interpreter (tests on CPU).
      include / exclude: regular expressions on parameter paths.
    """

    backend: str = "auto"
    interpret: bool = False
    include: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None

    order: ClassVar[int] = ORDER_LOWER

    def run(self, program) -> PassResult:
        rule = PathRule(self.include, self.exclude)
        report = PassReport("LowerToPallas", f"backend={self.backend!r}" + (", interpret" if self.interpret else ""))
        nodes = {p: q for p, q in program.structured_params() if isinstance(q, QArray)}
        from jaxpass.passes.sparsify.lowering import lower_sparse  # 2:4 weights (Sparsify)
        sparse_repl, sparse_rules = lower_sparse(program, rule, report, self.backend, self.interpret)
        if not nodes and not sparse_repl:
            raise PassError("LowerToPallas: the program has no quantized weights; put a "
                            "Quantize pass before it (passes=[Quantize(...), LowerToPallas()]), or "
                            "Sparsify(pattern='2:4') for the sparse kernel" +
                            "".join(f"; {w}: {y}" for w, y in report.skipped[:4]))
        leaf_owner = {}
        for node, q in nodes.items():
            for sub in (".qvalue", ".scale", ".zero", ".in_scale"):
                leaf_owner[node + sub] = node
        sites_by_node, why_not = defaultdict(list), {}
        for site in program.provenance:
            if site.primitive in LAYOUT_PRIMITIVES:
                continue  # provenance follows the weight through it to its real use
            owners = {leaf_owner.get(p.param) for p in site.in_provs if p is not None}
            owners.discard(None)
            for node in owners:
                if site.primitive != OP:
                    why_not.setdefault(node, f"also used by {site.location()}")
                    continue
                provs = [p for p in site.in_provs[1:] if p is not None]
                if any(set(p.via) - {"transpose"} or p.sliced for p in provs):
                    why_not.setdefault(node, "reaches its matmul through layout ops other than a "
                                             "transpose, or through a scan (stacked weights are "
                                             "not lowered in this version)")
                    continue
                reason = _lowerable(site, nodes[node])
                if reason:
                    why_not.setdefault(node, reason)
                else:
                    sites_by_node[node].append(site)
        replacements = {}
        for node, q in nodes.items():
            if not rule.matches(node):
                continue
            if node in why_not or node not in sites_by_node:
                report.skipped.append((node, why_not.get(node, "no quantized matmul uses it")))
                continue
            if _is_sharded(q):
                report.skipped.append((node, "sharded across devices (Shard runs before this "
                                             "pass): the kernels take a whole weight on one "
                                             "device, so this matmul stays on XLA's sharded path"))
                continue
            k_axes = {_param_k_axis(s) for s in sites_by_node[node]}
            if len(k_axes) != 1:
                report.skipped.append((node, "its matmuls contract different axes of it"))
                continue
            replacements[node] = _make(q, k_axes.pop())
            report.matched_ops.extend(f"{s.location()} [{node}]" for s in sites_by_node[node])
        replacements.update(sparse_repl)
        if not replacements:
            raise PassError("LowerToPallas: no quantized matmul can use a kernel: " +
                            "; ".join(f"{w}: {y}" for w, y in report.skipped[:6]))
        backend, interpret = self.backend, self.interpret

        def lower(ctx, eqn, invals):
            views = invals[1:]
            if not views or not all(isinstance(v, ComponentView) for v in views):
                return NotImplemented
            owner = views[0].owner
            if not isinstance(owner, PackedLinear) or not all(owner.same_weight(v.owner) for v in views):
                return NotImplemented
            rc = eqn.params["dimension_numbers"][0][1]
            if tuple(rc) != ((1,) if owner.transposed else (0,)):
                return NotImplemented  # not contracted over K in this orientation
            from jaxpass.kernels_pallas.quantized_matmul import quantized_matmul, select_implementation

            x = invals[0]
            out_dtype = jnp.dtype(eqn.params["out_dtype"])
            compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.float32
            sel = select_implementation(x.shape, compute, owner.packed, backend=backend,
                                        platform="gpu" if (interpret and backend == "auto") else None)
            ctx.record("rewrite", eqn, owner.source,
                       f"M={_m(x.shape)} K={owner.packed.k} N={owner.packed.n} {owner.packed.format}: "
                       f"{sel.backend} ({sel.reason})")
            y = quantized_matmul(x.astype(compute), owner.packed, backend=backend, interpret=interpret)
            return y.astype(out_dtype)

        from jaxpass.passes.sparsify.lowering import first_applicable  # int4 + 2:4 shares OP
        shared = [sparse_rules[OP]] if OP in sparse_rules else []
        handlers = {**sparse_rules, OP: first_applicable(lower, *shared)}
        rules = Rules(handlers, structured_only=frozenset(handlers))
        return PassResult(replacements, rules, report, tolerance=1e-2)


def _is_sharded(q) -> bool:
    """Whether any array of ``q`` is split across several devices (placed by ``passes.Shard``)."""
    for leaf in jax.tree_util.tree_leaves(q):
        sh = getattr(leaf, "sharding", None)
        if sh is not None and len(sh.device_set) > 1 and not sh.is_fully_replicated:
            return True
    return False


def _param_k_axis(site) -> int:
    """The parameter axis a lowerable quantized matmul contracts (through a possible transpose)."""
    rc = site.eqn.params["dimension_numbers"][0][1][0]
    (k,) = site.in_provs[1].axes[rc]
    return k


def _m(shape) -> int:
    m = 1
    for d in shape[:-1]:
        m *= int(d)
    return m


def _make(q: QArray, k_axis: int) -> PackedLinear:
    if isinstance(q.qvalue, jax.ShapeDtypeStruct):
        return jax.eval_shape(lambda q: _pack(q, k_axis), q)
    return _pack(q, k_axis)
