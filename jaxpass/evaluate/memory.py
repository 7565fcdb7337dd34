"""Memory accounting of params and KV caches (any pytree of arrays, quantized ones included)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (arrays or ShapeDtypeStructs; packed int4
    leaves count at their storage dtype)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def kv_bytes_per_token(cache: Any, max_len: int) -> float:
    """Bytes of the cache pytree per token of capacity (``tree_bytes(cache) / max_len``)."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    return tree_bytes(cache) / max_len


def param_bytes(model_or_params: Any) -> int:
    """Bytes of a model's params: a transformed model's ``.params``, an NNX module's
    ``nnx.Param`` state, or a params pytree."""
    params = getattr(model_or_params, "params", None)
    if params is not None and not callable(params):
        return tree_bytes(params)
    try:
        from flax import nnx
        if isinstance(model_or_params, nnx.Module):
            return tree_bytes(nnx.state(model_or_params, nnx.Param))
    except ImportError:  # pragma: no cover
        pass
    return tree_bytes(model_or_params)


def model_kv_bytes_per_token(model: Any, max_len: int = 1024, dtype=None) -> float:
    """Bytes per token (batch 1) of the cache ``model.init_cache`` builds, measured abstractly
    (nothing is allocated). A transformed model that changes the cache layout reports its own."""
    from jaxpass.models.generate import _find_init_cache

    init = _find_init_cache(model)
    cache = jax.eval_shape(lambda: init(1, max_len, dtype=dtype))
    return kv_bytes_per_token(cache, max_len)


def peak_bytes(fn, *args, donate_argnums=()) -> dict:
    """Peak device memory of one call of ``jax.jit(fn)(*args)``, from XLA's buffer assignment.

    Returns ``{"arguments", "outputs", "temporaries", "aliased", "peak"}`` in bytes, where peak is
    arguments + outputs + temporaries - aliased (donated buffers counted once). This is what the
    compiled program needs at its high-water mark, on any backend, without running it; on a GPU,
    ``jax.devices()[0].memory_stats()["peak_bytes_in_use"]`` measures the same at run time.
    ``donate_argnums``: arguments updated in place (a KV cache carried from step to step, as in
    the ``while_loop`` of ``generate``), so their outputs alias them instead of adding to the peak.
    """
    stats = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile().memory_analysis()
    if stats is None:  # pragma: no cover - backends without buffer assignment stats
        raise NotImplementedError("this backend reports no memory analysis")
    out = {"arguments": int(stats.argument_size_in_bytes), "outputs": int(stats.output_size_in_bytes),
           "temporaries": int(stats.temp_size_in_bytes), "aliased": int(stats.alias_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out
