"""Putting arrays on a mesh: parameters, batches and KV caches, in one or several processes.

``jax.device_put`` of a host value onto a mesh that spans several processes needs every process
to hold the same full value; :func:`place` then builds the global array from each process's
addressable shards (``jax.make_array_from_callback``), so the same code runs on one GPU, on
several GPUs of one host and on a multi-host pod. Abstract values (``ShapeDtypeStruct``) get the
sharding attached and stay abstract.
"""

from __future__ import annotations

import numpy as np

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpass.sharding.rules import as_entries, shards, to_partition_spec


def place(x, sharding: NamedSharding):
    """``x`` (array or ShapeDtypeStruct) with ``sharding``."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                    weak_type=bool(getattr(x, "weak_type", False)))
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def batch_spec(ndim: int, batch_axes, mesh: Mesh, size: int | None = None, batch_dim: int = 0) -> PartitionSpec:
    """Spec sharding dimension ``batch_dim`` over ``batch_axes`` (dropped if ``size`` does not
    divide by their product)."""
    axes = tuple(a for a in as_entries(batch_axes) if a in mesh.axis_names)
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    if size is not None and axes and size % shards(axes, sizes):
        axes = ()
    spec = [None] * ndim
    if axes and ndim:
        spec[batch_dim] = axes[0] if len(axes) == 1 else axes
    return to_partition_spec(tuple(spec))


def shard_batch(x, mesh: Mesh, batch_axes=("data", "fsdp")):
    """A batch (array or pytree of arrays, batch on axis 0) sharded over ``batch_axes``.

    In a multi-process run each process passes its *own* rows (``process_count`` times fewer);
    the global batch is their concatenation (``jax.make_array_from_process_local_data``).
    """
    def one(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        rows = a.shape[0] * jax.process_count()
        s = NamedSharding(mesh, batch_spec(a.ndim, batch_axes, mesh, rows))
        if jax.process_count() == 1:
            return jax.device_put(a, s)
        return jax.make_array_from_process_local_data(s, np.asarray(a))
    return jax.tree_util.tree_map(one, x)


def shard_kv_cache(cache, mesh: Mesh, batch_axes=("data", "fsdp"), head_axes=("tensor",)):
    """A KV cache (arrays ``[..., batch, length, kv_heads, head_dim]``, an optional leading layer
    axis) sharded by batch and by heads, as ``passes.Shard`` annotates it inside the program.
    A mesh axis that does not divide its dimension is left out."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))

    def one(a):
        spec = [None] * a.ndim
        b, h = a.ndim - 4, a.ndim - 2
        for d, axes in ((b, batch_axes), (h, head_axes)):
            axes = tuple(x for x in as_entries(axes) if x in sizes)
            if axes and a.shape[d] % shards(axes, sizes) == 0:
                spec[d] = axes[0] if len(axes) == 1 else axes
        return place(a, NamedSharding(mesh, to_partition_spec(tuple(spec))))
    return jax.tree_util.tree_map(one, cache)


def shardings_of(tree) -> dict[str, str]:
    """``{keystr path: str(PartitionSpec)}`` of every array leaf (for reports and tests)."""
    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        s = getattr(x, "sharding", None)
        out[jax.tree_util.keystr(p)] = str(s.spec) if isinstance(s, NamedSharding) else str(s)
    return out
