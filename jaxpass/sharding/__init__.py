"""Sharding for jaxpass: meshes, rules (parameter-path regexes or logical axis names) and presets.

    from jaxpass import sharding, passes
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})           # axis_types="explicit" too
    t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset="fsdp+tp")], example_args=(ids,))
    ids = sharding.shard_batch(ids, mesh)                           # batch over data/fsdp axes
    print(sharding.shardings_of(t.params))

``passes.Shard`` applies them to a transformed program; see ``docs/sharding.md``.
"""

from jaxpass.sharding.distributed import DistributedConfigError, initialize, preflight
from jaxpass.sharding.mesh import axis_sizes, is_explicit, make_mesh, mesh_from_state, mesh_state
from jaxpass.sharding.place import batch_spec, place, shard_batch, shard_kv_cache, shardings_of
from jaxpass.sharding.presets import PRESETS, logical_axes, preset_rules
from jaxpass.sharding.rules import LogicalRules, PathRules, leaf_specs

__all__ = ["initialize", "preflight", "DistributedConfigError", "make_mesh", "axis_sizes", "is_explicit", "mesh_state", "mesh_from_state", "place",
           "batch_spec", "shard_batch", "shard_kv_cache", "shardings_of", "PRESETS",
           "logical_axes", "preset_rules", "LogicalRules", "PathRules", "leaf_specs"]
