"""LowerToPallas for sparse weights: compressed storage and the sparse-matmul kernels.

``LowerToPallas`` calls :func:`lower_sparse` for the :class:`SparseArray` weights an earlier
``Sparsify`` made. A 2-D weight used as ``x[..., K] @ W[K, N]`` (or ``x @ W.T``, through casts)
is packed once into a compressed format of :mod:`jaxpass.kernels_pallas.sparse_matmul`, and its
matmuls call ``sparse_matmul``, which picks the format's Pallas kernel or XLA per shape and says
why:

* 2:4 (``Sparsify(pattern="2:4")``): values + 2-bit positions (``Packed24``), 1.125 B/weight
  in bf16;
* any other pattern (unstructured, or N:M other than 2:4): the bitmap format (``PackedBitmap``:
  bitmap + compacted values + block offsets) when it really has fewer bytes than the dense
  weight, i.e. when enough of the weight is zero (about 40% for bf16, with padding counted);
* 2:4 then symmetric int4 (``[Sparsify(pattern="2:4"), Quantize(weights="int4",
  symmetric=True, group_size=g)]``): the int4 + 2:4 format (``PackedInt424``) when the quantized
  codes really are 2:4 along K (checked) and the matmul is a plain weight-only one;
* any other sparse int8 / int4 weight (or int4 that fails that check): the ordinary
  quantized-matmul packing and kernel, as LowerToPallas does for a dense QArray (the zeros are
  stored as codes), with the reason the combined format was not used in the report.

Anything else stays as it is, with the reason in the report.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from jaxpass.core.values import LAYOUT_PRIMITIVES, ComponentView, StructuredValue, is_structured
from jaxpass.passes.sparsify.values import SparseArray

QOP = "jaxpass.quantized_dot_general"


@dataclasses.dataclass
class SparseLinear(StructuredValue):
    """A :class:`SparseArray` weight packed for a sparse-matmul kernel (base of the formats).

    ``packed``: a packed sparse weight of :mod:`jaxpass.kernels_pallas.sparse_matmul` (logical
    ``[K, N]``); ``transposed``: the value stands for ``W.T``; ``logical_dtype``: the dtype the
    program sees (after casts); :meth:`component` rebuilds the old ``.value`` leaf exactly.
    """

    packed: object
    transposed: bool = False
    logical_dtype: object = jnp.float32
    source: str = ""

    format_name = "packed-sparse"

    @property
    def shape(self):
        k, n = self.packed.k, self.packed.n
        return (n, k) if self.transposed else (k, n)

    @property
    def dtype(self):
        return self.logical_dtype

    def describe(self) -> str:
        return f"{self.packed.format} compressed ({self.packed.nbytes} B)"

    def materialize(self):
        from jaxpass.kernels_pallas.sparse_matmul.formats_reference import dense_weight
        w = dense_weight(self.packed).astype(self.logical_dtype)
        return w.T if self.transposed else w

    def component(self, name: str):
        if name != ".value":
            raise KeyError(name)
        return self.materialize()

    def apply_layout(self, name, params, *index_operands):
        if name == "transpose" and tuple(params["permutation"]) == (1, 0):
            return dataclasses.replace(self, transposed=not self.transposed)
        if name == "convert_element_type" and jnp.issubdtype(params["new_dtype"], jnp.floating):
            return dataclasses.replace(self, logical_dtype=jnp.dtype(params["new_dtype"]))
        if name in ("copy", "copy_p"):
            return self
        return None

    def kernel_weight(self):
        """The packed weight with its values in the program's dtype (what the kernel reads)."""
        return self.packed


@dataclasses.dataclass
class Sparse24Linear(SparseLinear):
    """A 2:4 weight in the compressed 2:4 format (``Packed24``)."""

    format_name = "packed-2:4"

    def describe(self) -> str:
        return f"{self.packed.format} compressed (values + 2-bit positions, {self.packed.nbytes} B)"

    def kernel_weight(self):
        pw = self.packed
        if jnp.dtype(pw.dtype) != jnp.dtype(self.logical_dtype):
            pw = dataclasses.replace(pw, v0=pw.v0.astype(self.logical_dtype), v1=pw.v1.astype(self.logical_dtype))
        return pw


@dataclasses.dataclass
class BitmapLinear(SparseLinear):
    """An unstructured-sparse weight in the bitmap format (``PackedBitmap``)."""

    format_name = "packed-bitmap"

    def describe(self) -> str:
        p = self.packed
        return (f"{p.format} compressed ({100 * p.sparsity:.1f}% zeros; bitmap + values + offsets, "
                f"{p.nbytes} B incl. {p.padding_bytes} B padding)")

    def kernel_weight(self):
        pw = self.packed
        if jnp.dtype(pw.dtype) != jnp.dtype(self.logical_dtype):
            pw = dataclasses.replace(pw, values=pw.values.astype(self.logical_dtype))
        return pw


@dataclasses.dataclass
class Int424Linear(SparseLinear):
    """A 2:4-sparse symmetric-int4 weight in the int4 + 2:4 format (``PackedInt424``).

    It replaces a ``SparseArray(QArray)`` node; :meth:`component` rebuilds the old leaves
    (``.value.qvalue``, ``.value.scale``) exactly, for equations that still read them.
    """

    pattern: str = "2:4"

    format_name = "packed-int4+2:4"

    def describe(self) -> str:
        return f"{self.packed.format} compressed (int4 codes + 2-bit positions + scales, {self.packed.nbytes} B)"

    def to_sparse_qarray(self) -> SparseArray:
        """The ``SparseArray(QArray)`` this value stands for, in its current orientation."""
        from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import int4_24_codes
        from jaxpass.passes.quantize.qarray import QArray, pack_nibbles

        q = int4_24_codes(self.packed).astype(jnp.int8)               # [K, N]
        qa = QArray(pack_nibbles(q, 0), self.packed.scales, None, self.logical_dtype, "int4", -2,
                    self.source + ".value")
        if self.transposed:
            qa = qa.apply_layout("transpose", {"permutation": (1, 0)})
        return SparseArray(qa, self.pattern, -1 if self.transposed else -2, self.source)

    def component(self, name: str):
        leaves = {jax.tree_util.keystr(p): v for p, v in
                  jax.tree_util.tree_flatten_with_path(self.to_sparse_qarray())[0]}
        return leaves[name]


@dataclasses.dataclass
class QuantizedSparseLinear(StructuredValue):
    """A sparse, quantized ``SparseArray(QArray)`` weight that has no combined format (int8, or
    int4 that is not 2:4 along K): its QArray packed for the ordinary quantized-matmul kernels
    (``inner``, a :class:`~jaxpass.passes.lower_to_pallas.PackedLinear`), zeros stored as codes.
    ``note`` says why the combined format was not used (for the report)."""

    inner: object
    pattern: str = "unstructured"
    note: str = ""

    @property
    def source(self) -> str:
        return self.inner.source.removesuffix(".value")

    @property
    def format_name(self) -> str:
        return self.inner.format_name

    @property
    def shape(self):
        return self.inner.shape

    @property
    def dtype(self):
        return self.inner.dtype

    def describe(self) -> str:
        return f"{self.inner.describe()}, {self.pattern} sparse (zeros stored as codes)"

    def materialize(self):
        return self.inner.materialize()

    def component(self, name: str):
        if not name.startswith(".value"):
            raise KeyError(name)
        return self.inner.component(name[len(".value"):])

    def apply_layout(self, name, params, *index_operands):
        moved = self.inner.apply_layout(name, params, *index_operands)
        return None if moved is None else dataclasses.replace(self, inner=moved)


jax.tree_util.register_dataclass(QuantizedSparseLinear, data_fields=["inner"], meta_fields=["pattern", "note"])

for _cls, _extra in ((Sparse24Linear, []), (BitmapLinear, []), (Int424Linear, ["pattern"])):
    jax.tree_util.register_dataclass(_cls, data_fields=["packed"],
                                     meta_fields=["transposed", "logical_dtype", "source", *_extra])


def _why_not(site, node: SparseArray, kind: str) -> str | None:
    p = site.eqn.params
    if kind == "quantized":
        from jaxpass.passes.lower_to_pallas import _lowerable
        return _lowerable(site, node.value)
    if site.primitive == QOP:
        if p.get("fmt") != "int4":
            return f"{p.get('fmt')}-quantized: only int4 has a combined sparse kernel"
        if p.get("has_zero"):
            return "asymmetric int4 (zero points): the int4 + 2:4 format is symmetric"
        if p.get("activations") is not None or p.get("has_act_scale"):
            return "activation quantization is not lowered with sparse weights"
        if p.get("has_in_scale") or p.get("has_outliers"):
            return "AWQ input scales / outliers are not lowered with sparse weights"
        if p.get("weight_operand") != 1:
            return "the weight is the left operand of its matmul"
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb:
        return "batched matmul"
    if len(rc) != 1 or node.ndim != 2:
        return f"weight of rank {node.ndim} contracted over {len(rc)} axes (the kernels take 2-D weights)"
    x_aval = site.eqn.invars[0].aval
    if tuple(lc) != (x_aval.ndim - 1,):
        return "activation not contracted over its last axis"
    if not jnp.issubdtype(x_aval.dtype, jnp.floating):
        return "integer activations"
    return None


def _classify(v: SparseArray) -> tuple[str | None, str | None]:
    """(kind, why not): kind is "2:4", "bitmap", "int4+2:4" or "quantized" (the ordinary
    quantized-matmul path for a sparse QArray without a combined format)."""
    from jaxpass.passes.quantize.qarray import QArray

    if is_structured(v.value):
        q = v.value
        if not isinstance(q, QArray):
            return None, f"{v.pattern} sparse and {q.format_name}: no sparse kernel for it (stays on XLA)"
        from jaxpass.passes.lower_to_pallas import LOWERABLE_FORMATS
        if q.fmt not in LOWERABLE_FORMATS:
            return None, (f"{v.pattern} sparse and {q.fmt}-quantized: no kernel for {q.fmt} (stays on "
                          "XLA's quantized path)")
        if v.pattern != "2:4" or q.fmt != "int4" or q.zero is not None:
            return "quantized", None
        if q.in_scale is not None or q.outlier_idx is not None or q.act_scale is not None:
            return "quantized", None
        return "int4+2:4", None
    return ("2:4" if v.pattern == "2:4" else "bitmap"), None


def lower_sparse(program, rule, report, backend: str, interpret: bool):
    """(replacements, handlers) for the sparse weights of ``program``."""
    nodes, kinds = {}, {}
    for p, v in program.structured_params():
        if not isinstance(v, SparseArray) or not rule.matches(p):
            continue
        kind, why = _classify(v)
        if why:
            report.skipped.append((p, why))
        else:
            nodes[p], kinds[p] = v, kind
    if not nodes:
        return {}, {}
    owner = {}
    for p, kind in kinds.items():
        subs = {"int4+2:4": (".value.qvalue", ".value.scale"),
                "quantized": (".value.qvalue", ".value.scale", ".value.zero", ".value.in_scale")}
        for sub in subs.get(kind, (".value",)):
            owner[p + sub] = p
    sites, why_not = defaultdict(list), {}
    for site in program.provenance:
        if site.primitive in LAYOUT_PRIMITIVES:
            continue
        users = {owner.get(prov.param): op for op, prov in enumerate(site.in_provs)
                 if prov is not None and owner.get(prov.param)}
        for node, op in users.items():
            want = QOP if kinds[node] in ("int4+2:4", "quantized") else "dot_general"
            provs = [pr for pr in site.in_provs[1:] if pr is not None and owner.get(pr.param) == node]
            if site.primitive != want:
                why_not.setdefault(node, f"also used by {site.location()}")
            elif op == 0:
                why_not.setdefault(node, "the weight is the left operand of its matmul")
            elif any(set(pr.via) - {"transpose", "convert_element_type"} or pr.sliced for pr in provs):
                why_not.setdefault(node, "reaches its matmul through layout ops other than a "
                                         "transpose or cast, or through a scan (stacked weights "
                                         "are not lowered in this version)")
            else:
                reason = _why_not(site, nodes[node], kinds[node])
                if reason:
                    why_not.setdefault(node, reason)
                else:
                    sites[node].append(site)
    replacements = {}
    for node, v in nodes.items():
        if node in why_not or node not in sites:
            report.skipped.append((node, why_not.get(node, "no matmul uses it")))
            continue
        ks = set()
        for s in sites[node]:
            rc = s.eqn.params["dimension_numbers"][0][1][0]
            ks |= set(s.in_provs[1].axes[rc])
        if len(ks) != 1:
            report.skipped.append((node, "its matmuls contract different axes of it"))
            continue
        from jaxpass.passes.lower_to_pallas import _is_sharded
        if _is_sharded(v):
            report.skipped.append((node, "sharded across devices (Shard runs before this pass): the "
                                         "kernels take a whole weight on one device (stays on XLA)"))
            continue
        made = _PACKERS[kinds[node]](v, ks.pop())
        if isinstance(made, str):
            report.skipped.append((node, made))
            continue
        replacements[node] = made
        report.matched_ops.extend(f"{s.location()} [{node}]" for s in sites[node])

    def record_and_run(ctx, eqn, x, o: SparseLinear):
        from jaxpass.kernels_pallas.sparse_matmul import select_implementation, sparse_matmul

        compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.float32
        pw = o.kernel_weight()
        sel = select_implementation(x.shape, compute, pw, backend=backend,
                                    platform="gpu" if (interpret and backend == "auto") else None)
        m = 1
        for d in x.shape[:-1]:
            m *= int(d)
        label = "2:4" if isinstance(o, Sparse24Linear) else pw.format
        ctx.record("rewrite", eqn, o.source, f"M={m} K={pw.k} N={pw.n} {label}: {sel.backend} ({sel.reason})")
        y = sparse_matmul(x.astype(compute), pw, backend=backend, interpret=interpret)
        return y.astype(eqn.outvars[0].aval.dtype)

    def contracted_ok(eqn, o) -> bool:
        rc = eqn.params["dimension_numbers"][0][1]
        return tuple(rc) == ((1,) if o.transposed else (0,))

    def lower_dense(ctx, eqn, invals):
        w = invals[1] if len(invals) > 1 else None
        if not isinstance(w, ComponentView) or not isinstance(w.owner, (Sparse24Linear, BitmapLinear)):
            return NotImplemented
        if not contracted_ok(eqn, w.owner) or is_structured(invals[0]):
            return NotImplemented
        return record_and_run(ctx, eqn, invals[0], w.owner)

    def lower_quantized(ctx, eqn, invals):
        views = invals[1:]
        kinds_ok = (Int424Linear, QuantizedSparseLinear)
        if not views or not all(isinstance(v, ComponentView) and isinstance(v.owner, kinds_ok) for v in views):
            return NotImplemented
        o = views[0].owner
        if isinstance(o, Int424Linear):
            if not contracted_ok(eqn, o) or is_structured(invals[0]):
                return NotImplemented
            return record_and_run(ctx, eqn, invals[0], o)
        return run_plain_quantized(ctx, eqn, invals[0], o)

    def run_plain_quantized(ctx, eqn, x, o: QuantizedSparseLinear):
        """The ordinary quantized-matmul kernel path (what LowerToPallas does for a QArray)."""
        from jaxpass.kernels_pallas.quantized_matmul import quantized_matmul, select_implementation

        inner = o.inner
        if not contracted_ok(eqn, inner) or is_structured(x):
            return NotImplemented
        compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.float32
        sel = select_implementation(x.shape, compute, inner.packed, backend=backend,
                                    platform="gpu" if (interpret and backend == "auto") else None)
        m = 1
        for d in x.shape[:-1]:
            m *= int(d)
        ctx.record("rewrite", eqn, o.source, f"M={m} K={inner.packed.k} N={inner.packed.n} "
                   f"{inner.packed.format} ({o.pattern} sparse, {o.note}): {sel.backend} ({sel.reason})")
        y = quantized_matmul(x.astype(compute), inner.packed, backend=backend, interpret=interpret)
        return y.astype(jnp.dtype(eqn.params["out_dtype"]))

    handlers = {"dot_general": lower_dense}
    if any(k in ("int4+2:4", "quantized") for k in kinds.values()):
        handlers[QOP] = lower_quantized
    return replacements, handlers


def first_applicable(*handlers):
    """One rule from several for the same primitive: the first that does not return
    NotImplemented (LowerToPallas's quantized-matmul rule and this module's int4 + 2:4 rule)."""
    def rule(ctx, eqn, invals):
        for h in handlers:
            out = h(ctx, eqn, invals)
            if out is not NotImplemented:
                return out
        return NotImplemented
    return rule


def _oriented(w, k_axis: int):
    return (w.T if k_axis == 1 else w), k_axis == 1


def _pack_24(v: SparseArray, k_axis: int):
    from jaxpass.kernels_pallas.sparse_matmul.layout import check_24, pack_24

    w = v.value
    if v.shape[k_axis] % 8:
        return (f"contracting dimension {v.shape[k_axis]} is not a multiple of 8 (the compressed "
                "format's nibble pairing)")
    transposed = k_axis == 1
    if isinstance(w, jax.ShapeDtypeStruct):
        packed = jax.eval_shape(pack_24, jax.ShapeDtypeStruct(w.shape[::-1] if transposed else w.shape, w.dtype))
    else:
        try:
            check_24(w, k_axis)
        except ValueError as e:
            return str(e)
        packed = pack_24(w.T if transposed else w)
    return Sparse24Linear(packed, transposed, jnp.dtype(w.dtype), v.source)


def _pack_bitmap(v: SparseArray, k_axis: int):
    from jaxpass.kernels_pallas.sparse_matmul.bitmap_layout import pack_bitmap

    w = v.value
    if isinstance(w, jax.ShapeDtypeStruct):
        return ("abstract weight: the bitmap format's size depends on the values (pass concrete "
                "params to lower it; jaxpass.load cannot rebuild a bitmap-lowered checkpoint, "
                "so save before LowerToPallas); stored dense")
    if v.shape[k_axis] % 32:
        return (f"{v.pattern} sparse: contracting dimension {v.shape[k_axis]} is not a multiple of 32 "
                "(one bitmap word per 32 rows); stored dense")
    if jnp.dtype(w.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"{v.pattern} sparse {jnp.dtype(w.dtype).name} weight: the bitmap format takes f32/bf16/f16"
    wk, transposed = _oriented(w, k_axis)
    packed = pack_bitmap(wk)
    dense = int(np.prod(w.shape)) * jnp.dtype(w.dtype).itemsize
    if packed.nbytes >= dense:
        return (f"{v.pattern} sparse at {100 * packed.sparsity:.1f}% zeros: the bitmap format would "
                f"take {packed.nbytes} B (incl. {packed.padding_bytes} B padding) against {dense} B "
                "dense; stored dense")
    return BitmapLinear(packed, transposed, jnp.dtype(w.dtype), v.source)


def _pack_int4_24(v: SparseArray, k_axis: int):
    from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import pack_int4_24

    q = v.value
    k = q.shape[k_axis]
    groups = q.scale.shape[k_axis]
    if k % 8:
        return _pack_quantized(v, k_axis, f"contracting dimension {k} is not a multiple of 8 (the 2:4 nibble pairing)")
    if k % groups:
        return f"int4 with a ragged last group (K={k}, {groups} groups): stays on XLA's int4 path"
    if q.scale.shape[1 - k_axis] != q.shape[1 - k_axis]:
        return _pack_quantized(v, k_axis, f"int4 scales of shape {tuple(q.scale.shape)} are not per output channel")
    transposed = k_axis == 1
    if v.k_axis is None or v.k_axis % 2 != k_axis:
        return _pack_quantized(v, k_axis, f"its 2:4 groups do not run along the contracting axis {k_axis}")
    n = q.shape[1 - k_axis]
    if isinstance(q.qvalue, jax.ShapeDtypeStruct):
        # Abstract params (jaxpass.load re-runs the recipe on shapes): the decision above rests
        # on static facts only, so the abstract structure matches the one packed from values.
        from jaxpass.kernels_pallas.sparse_matmul.int4_24_layout import PackedInt424
        sds = jax.ShapeDtypeStruct
        packed = PackedInt424(sds((n, k // 4), jnp.uint8), sds((n, k // 8), jnp.uint8),
                              sds((groups, n), jnp.float32), k, n, k // groups)
        return Int424Linear(packed, transposed, jnp.dtype(q.dtype), v.source, v.pattern)
    codes, scale = q.codes(), q.scale.astype(jnp.float32)
    if transposed:
        codes, scale = codes.T, scale.T
    try:
        packed = pack_int4_24(codes, scale, k // groups)
    except ValueError as e:
        return _pack_quantized(v, k_axis, f"int4 codes are not 2:4 along K after quantization: {e}")
    return Int424Linear(packed, transposed, jnp.dtype(q.dtype), v.source, v.pattern)


def _pack_quantized(v: SparseArray, k_axis: int, note: str | None = None):
    """The ordinary quantized-matmul packing of the QArray inside ``v``."""
    from jaxpass.passes.lower_to_pallas import _make

    q = v.value
    if note is None:
        note = (f"{q.fmt}{'' if q.zero is None else ' asymmetric'}: no combined sparse format "
                "(only 2:4 + symmetric int4 without AWQ scales or outliers has one)")
    return QuantizedSparseLinear(_make(q, k_axis), v.pattern, note)


_PACKERS = {"2:4": _pack_24, "bitmap": _pack_bitmap, "int4+2:4": _pack_int4_24,
            "quantized": _pack_quantized}
