"""Where a model's cache lives: which leaves of its ``init_cache`` pytree are which layer's
K and V caches, found by tracing ``forward_cached`` and reading the operands of its
``jaxpass.kv_cache_update`` equations. Then the compressed cache is built leaf for leaf.

This is what lets the pass work on any model that follows the KV-cache contract of
docs/models.md (``init_cache(batch, max_len, dtype=None)``, ``forward_cached(ids, cache,
positions)``, the two named ops per layer), whatever the cache pytree looks like.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.pass_api import PassError
from jaxpass.passes.compress_kv.values import KVSide

UPDATE = "jaxpass.kv_cache_update"
ATTEND = "jaxpass.cached_attention"
CAUSAL = "jaxpass.causal_attention"


def _nested_names(jaxpr, out=None) -> set:
    out = set() if out is None else out
    for eqn in compat.jaxpr_of(jaxpr).eqns:
        out.add(eqn.primitive.name)
        for r in compat.eqn_regions(eqn):
            _nested_names(r.jaxpr, out)
    return out


def find_cache_layers(program, cache_leaf_offset: int, n_cache_leaves: int) -> list[tuple[int, int, int]]:
    """``[(layer, k_leaf, v_leaf)]``: for every top-level ``kv_cache_update``, the indices (in
    the flattened cache) of the cache leaves it updates."""
    jaxpr = program.jaxpr
    index = {v: i for i, v in enumerate(jaxpr.invars)}
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != UPDATE:
            continue
        ik, iv = (index.get(x) if not compat.is_literal(x) else None for x in eqn.invars[:2])
        ok = lambda i: i is not None and cache_leaf_offset <= i < cache_leaf_offset + n_cache_leaves
        if not (ok(ik) and ok(iv)):
            raise PassError(f"CompressKV: layer {eqn.params.get('layer')}'s kv_cache_update does "
                            "not read the cache leaves directly (the cache passes through other "
                            "ops before it); the compressed cache needs k_cache/v_cache to be "
                            "leaves of the cache argument")
        found.append((int(eqn.params.get("layer", -1)), ik - cache_leaf_offset,
                      iv - cache_leaf_offset))
    if not found:
        nested = _nested_names(jaxpr)
        if UPDATE in nested:
            raise PassError("CompressKV: the model's kv_cache_update ops are inside a loop or "
                            "scan (scan-over-layers, cache stacked on a layer axis); compressed "
                            "caches need one cache per layer: use "
                            "jaxpass.models.with_scan_layers(model, False)")
        raise PassError("CompressKV: forward_cached has no jaxpass.kv_cache_update op, so the "
                        "model exposes no cache operations to compress (see docs/kv_cache.md: "
                        "a model routes its cache through jaxpass.models.attention's named ops)")
    # Layers numbered in program order when the model did not number them (layer=-1).
    if len({l for l, _, _ in found}) != len(found) or any(l < 0 for l, _, _ in found):
        found = [(i, k, v) for i, (_, k, v) in enumerate(found)]
    return found


@dataclasses.dataclass(frozen=True)
class CacheBuilder:
    """``PassResult.inputs`` of CompressKV: builds the compressed cache for ``t.init_cache``."""

    policy: object
    include: object = None
    exclude: object = None
    method_name: str = "forward_cached"

    def selected(self, layer: int) -> bool:
        name = f"layers[{layer}]"
        inc = (self.include,) if isinstance(self.include, str) else tuple(self.include or ())
        exc = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude or ())
        if inc and not any(re.search(p, name) for p in inc):
            return False
        return not any(re.search(p, name) for p in exc)

    def init_cache(self, trace, dense_cache):
        leaves, treedef = jax.tree_util.tree_flatten(dense_cache)
        four = [x for x in leaves if len(x.shape) == 4]
        if not four:
            raise PassError("CompressKV: the model's init_cache gives no [batch, max_len, "
                            "kv_heads, head_dim] arrays (a scan-over-layers cache is stacked on "
                            "a layer axis: use jaxpass.models.with_scan_layers(model, False))")
        b = four[0].shape[0]
        prog = trace(self.method_name, jax.ShapeDtypeStruct((b, 1), jnp.int32), dense_cache,
                     jax.ShapeDtypeStruct((), jnp.int32))
        offset = (len(prog.param_leaves) + len(jax.tree_util.tree_leaves(prog.inputs.state)) + 1)
        layers = find_cache_layers(prog, offset, len(leaves))
        n_layers = len(layers)
        out = [jnp.zeros(x.shape, x.dtype) for x in leaves]
        for layer, ik, iv in layers:
            if not self.selected(layer):
                continue
            ks, vs = leaves[ik], leaves[iv]
            bb, length, kvh, d = ks.shape
            state = self.policy.init_state(bb, length, kvh, d, ks.dtype, layer, n_layers)
            out[ik] = KVSide("k", state, ks.shape, ks.dtype, layer, self.policy)
            out[iv] = KVSide("v", None, vs.shape, vs.dtype, layer, self.policy)
        return treedef.unflatten(out)
