"""LowerToPallas for 2:4 sparse weights: compressed storage and the sparse-matmul kernel.

``LowerToPallas`` calls :func:`lower_sparse` for the :class:`SparseArray` weights an earlier
``Sparsify(pattern="2:4")`` made. A 2-D weight used as ``x[..., K] @ W[K, N]`` (or ``x @ W.T``,
through casts) is packed once into the compressed 2:4 format
(:mod:`jaxpass.kernels_pallas.sparse_matmul.layout`: values + 2-bit positions, really fewer bytes)
and its matmuls call ``sparse_matmul``, which picks the Pallas kernel or XLA per shape and says
why. Anything else stays as it is, with the reason in the report.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import jax
import jax.numpy as jnp

from jaxpass.core.values import LAYOUT_PRIMITIVES, ComponentView, StructuredValue, is_structured
from jaxpass.passes.sparsify.values import SparseArray


@dataclasses.dataclass
class Sparse24Linear(StructuredValue):
    """A 2:4 :class:`SparseArray` weight packed for the sparse-matmul kernel.

    ``packed`` is a :class:`~jaxpass.kernels_pallas.sparse_matmul.layout.Packed24` (logical
    ``[K, N]``); ``transposed``: the value stands for ``W.T``; ``logical_dtype``: the dtype the
    program sees (after casts); :meth:`component` rebuilds the old ``.value`` leaf exactly.
    """

    packed: object
    transposed: bool = False
    logical_dtype: object = jnp.float32
    source: str = ""

    format_name = "packed-2:4"

    @property
    def shape(self):
        k, n = self.packed.k, self.packed.n
        return (n, k) if self.transposed else (k, n)

    @property
    def dtype(self):
        return self.logical_dtype

    def describe(self) -> str:
        return f"{self.packed.format} compressed (values + 2-bit positions, {self.packed.nbytes} B)"

    def materialize(self):
        from jaxpass.kernels_pallas.sparse_matmul.layout import unpack_24
        w = unpack_24(self.packed).astype(self.logical_dtype)
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


jax.tree_util.register_dataclass(Sparse24Linear, data_fields=["packed"],
                                 meta_fields=["transposed", "logical_dtype", "source"])


def _why_not(site, node: SparseArray) -> str | None:
    p = site.eqn.params
    (lc, rc), (lb, rb) = p["dimension_numbers"]
    if lb or rb:
        return "batched matmul"
    if len(rc) != 1 or node.ndim != 2:
        return f"weight of rank {node.ndim} contracted over {len(rc)} axes (the kernel takes 2-D weights)"
    x_aval = site.eqn.invars[0].aval
    if tuple(lc) != (x_aval.ndim - 1,):
        return "activation not contracted over its last axis"
    if not jnp.issubdtype(x_aval.dtype, jnp.floating):
        return "integer activations"
    return None


def lower_sparse(program, rule, report, backend: str, interpret: bool):
    """(replacements, handlers) for the 2:4 sparse weights of ``program``."""
    nodes = {p: v for p, v in program.structured_params() if isinstance(v, SparseArray) and rule.matches(p)}
    for p, v in list(nodes.items()):
        if is_structured(v.value):
            report.skipped.append((p, f"{v.pattern} sparse and {v.value.format_name}-quantized: no "
                                      "combined kernel in this version (stays on XLA)"))
            del nodes[p]
    for p, v in list(nodes.items()):
        if v.pattern != "2:4":
            report.skipped.append((p, f"{v.pattern} sparse: only 2:4 has a compressed format and "
                                      "kernel in this version (stored dense)"))
            del nodes[p]
    if not nodes:
        return {}, {}
    owner = {p + ".value": p for p in nodes}
    sites, why_not = defaultdict(list), {}
    for site in program.provenance:
        if site.primitive in LAYOUT_PRIMITIVES:
            continue
        for op, prov in enumerate(site.in_provs):
            node = owner.get(prov.param) if prov is not None else None
            if node is None:
                continue
            if site.primitive != "dot_general":
                why_not.setdefault(node, f"also used by {site.location()}")
            elif op != 1:
                why_not.setdefault(node, "the weight is the left operand of its matmul")
            elif set(prov.via) - {"transpose", "convert_element_type"} or prov.sliced:
                why_not.setdefault(node, "reaches its matmul through layout ops other than a "
                                         "transpose or cast, or through a scan (stacked weights "
                                         "are not lowered in this version)")
            else:
                reason = _why_not(site, nodes[node])
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
        k_axis = ks.pop()
        if v.shape[k_axis] % 8:
            report.skipped.append((node, f"contracting dimension {v.shape[k_axis]} is not a "
                                         "multiple of 8 (the compressed format's nibble pairing)"))
            continue
        if not isinstance(v.value, jax.ShapeDtypeStruct):
            from jaxpass.kernels_pallas.sparse_matmul.layout import check_24
            try:
                check_24(v.value, k_axis)
            except ValueError as e:
                report.skipped.append((node, str(e)))
                continue
        replacements[node] = _pack(v, k_axis)
        report.matched_ops.extend(f"{s.location()} [{node}]" for s in sites[node])

    def lower(ctx, eqn, invals):
        w = invals[1] if len(invals) > 1 else None
        if not isinstance(w, ComponentView) or not isinstance(w.owner, Sparse24Linear):
            return NotImplemented
        o = w.owner
        rc = eqn.params["dimension_numbers"][0][1]
        if tuple(rc) != ((1,) if o.transposed else (0,)):
            return NotImplemented
        from jaxpass.kernels_pallas.sparse_matmul import select_implementation, sparse_matmul

        x = invals[0]
        if is_structured(x):
            return NotImplemented
        compute = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16, jnp.float32) else jnp.float32
        pw = o.packed
        if jnp.dtype(pw.dtype) != jnp.dtype(o.logical_dtype):
            pw = dataclasses.replace(pw, v0=pw.v0.astype(o.logical_dtype), v1=pw.v1.astype(o.logical_dtype))
        sel = select_implementation(x.shape, compute, pw, backend=backend,
                                    platform="gpu" if (interpret and backend == "auto") else None)
        m = 1
        for d in x.shape[:-1]:
            m *= int(d)
        ctx.record("rewrite", eqn, o.source, f"M={m} K={pw.k} N={pw.n} 2:4: {sel.backend} ({sel.reason})")
        y = sparse_matmul(x.astype(compute), pw, backend=backend, interpret=interpret)
        return y.astype(eqn.outvars[0].aval.dtype)

    return replacements, {"dot_general": lower}


def _pack(v: SparseArray, k_axis: int) -> Sparse24Linear:
    from jaxpass.kernels_pallas.sparse_matmul.layout import pack_24

    w = v.value
    transposed = k_axis == 1
    if isinstance(w, jax.ShapeDtypeStruct):
        packed = jax.eval_shape(pack_24, jax.ShapeDtypeStruct(w.shape[::-1] if transposed else w.shape, w.dtype))
    else:
        packed = pack_24(w.T if transposed else w)
    return Sparse24Linear(packed, transposed, jnp.dtype(w.dtype), v.source)
