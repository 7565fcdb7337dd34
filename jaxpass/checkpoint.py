"""``jaxpass.save`` / ``jaxpass.load``: transformed params as orbax checkpoints.

A checkpoint directory holds

- ``arrays/``: an orbax checkpoint of every leaf of ``t.params`` and ``t.state`` (packed int4
  bytes, codes, scales, zero points, masks), keyed by their ``keystr`` paths. Float8 leaves are
  stored bit-cast to uint8 (and cast back on load), so the round trip is exact;
- ``jaxpass.json``: the recipe (each pass's repr), the example input signature, library versions;
- ``passes.pkl``: the pass objects themselves (passes are picklable by contract).

``load(path, model)`` re-runs the passes on the model's *abstract* params (shapes only: no
quantization, no calibration) to rebuild the rewritten program, then restores the arrays into it
and checks every shape and dtype.
"""

from __future__ import annotations

import json
import os
import pickle


import jax
import jax.numpy as jnp

_BITCAST = {jnp.dtype(jnp.float8_e4m3fn): jnp.uint8, jnp.dtype(jnp.float8_e5m2): jnp.uint8}


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _encode(x):
    x = jnp.asarray(x)
    return jax.lax.bitcast_convert_type(x, _BITCAST[x.dtype]) if x.dtype in _BITCAST else x


def _decode(x, dtype):
    dtype = jnp.dtype(dtype)
    return jax.lax.bitcast_convert_type(x, dtype) if dtype in _BITCAST else x


def _named_sharding(x):
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.NamedSharding) else None


def save(t, path: str) -> None:
    """Saves a transformed model's params, state and recipe to the directory ``path``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"jaxpass.save: {path} exists; choose a new directory")
    arrays = {"params": {k: _encode(v) for k, v in _flat(t.params).items()},
              "state": {k: _encode(v) for k, v in _flat(t.state).items()}}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "arrays"), arrays)
    ckptr.wait_until_finished()
    inputs = t.program.inputs
    meta = {
        "format": "jaxpass-checkpoint-1",
        "recipe": [repr(p) for p in t.passes],
        "example_args": [f"{jnp.dtype(x.dtype).name}{list(x.shape)}" for x in jax.tree_util.tree_leaves(inputs.args)],
        "params": {k: f"{jnp.dtype(v.dtype).name}{list(v.shape)}" for k, v in _flat(t.params).items()},
        "versions": {"jax": jax.__version__},
    }
    with open(os.path.join(path, "jaxpass.json"), "w") as f:
        json.dump(meta, f, indent=1)
    signature = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                       (inputs.args, inputs.kwargs, t._static_kw))
    with open(os.path.join(path, "passes.pkl"), "wb") as f:
        pickle.dump({"passes": list(t.passes), "signature": signature}, f)


def load(path: str, model, *, params=None):
    """Restores what :func:`save` wrote, for ``model`` (the original, untransformed model: an NNX
    or Equinox module, or a function with ``params=`` of the original structure; values may be
    abstract, e.g. from ``nnx.eval_shape`` or ``jax.ShapeDtypeStruct``s)."""
    import orbax.checkpoint as ocp

    from jaxpass.transform import transform_abstract

    path = os.path.abspath(path)
    with open(os.path.join(path, "passes.pkl"), "rb") as f:
        saved = pickle.load(f)
    args, kwargs, static_kw = saved["signature"]
    t = transform_abstract(model, saved["passes"], params=params, example_args=args,
                           example_kwargs={**kwargs, **dict(static_kw)})
    want = {"params": _flat(t.params), "state": _flat(t.state)}
    # Leaves the recipe shards (passes.Shard on abstract params attaches NamedShardings) are
    # restored straight into those shardings, on this process's mesh.
    target = {g: {k: jax.ShapeDtypeStruct(v.shape, _BITCAST.get(jnp.dtype(v.dtype), v.dtype),
                                          sharding=_named_sharding(v))
                  for k, v in leaves.items()} for g, leaves in want.items()}
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "arrays"), target)
    out = {}
    for group, leaves in want.items():
        missing = set(leaves) - set(restored[group])
        if missing:
            raise ValueError(f"jaxpass.load: checkpoint {path} lacks {group} {sorted(missing)[:4]}; "
                             "was it saved from this model and recipe?")
        vals = []
        for k, v in leaves.items():
            x = _decode(restored[group][k], v.dtype)
            if tuple(x.shape) != tuple(v.shape) or jnp.dtype(x.dtype) != jnp.dtype(v.dtype):
                raise ValueError(f"jaxpass.load: {group}{k} is {x.dtype}{list(x.shape)} in the "
                                 f"checkpoint, the recipe makes {v.dtype}{list(v.shape)}")
            vals.append(x)
        tree = t.params if group == "params" else t.state
        out[group] = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), vals)
    t.params, t.state = out["params"], out["state"]
    return t
