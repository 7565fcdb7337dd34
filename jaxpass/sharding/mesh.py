"""Mesh helpers: build a device mesh with the axis names the presets use, and ship meshes around.

The presets of :mod:`jaxpass.sharding.presets` shard over mesh axes named ``"data"`` (pure data
parallelism: the batch), ``"fsdp"`` (the batch *and* the parameters, ZeRO-3 style) and
``"tensor"`` (Megatron tensor parallelism). :func:`make_mesh` builds such a mesh from axis sizes,
with JAX's *auto* axes (GSPMD propagates shardings; activations are annotated with
``with_sharding_constraint``) or *explicit* axes (shardings are part of array types; activations
are annotated with ``jax.sharding.reshard``).

A ``jax.sharding.Mesh`` holds ``Device`` objects, which do not pickle; passes must (they are
stored in checkpoints), so :func:`mesh_state` / :func:`mesh_from_state` describe a mesh by device
ids, axis names and axis types and rebuild it on the devices of the process that loads it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

import jax
from jax.sharding import AxisType, Mesh

AXIS_ORDER = ("data", "fsdp", "tensor")


def make_mesh(axes: Mapping[str, int] | None = None, *, axis_types: str = "auto",
              devices: Sequence | None = None) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes).

    Args:
      axes: axis name -> size, in mesh order, e.g. ``{"fsdp": 2, "tensor": 4}``. One size may be
        ``-1`` (whatever the devices leave). Default: ``{"data": n_devices}``.
      axis_types: ``"auto"`` or ``"explicit"`` (JAX's sharding-in-types mode).
      devices: the devices to use (e.g. ``jax.devices()[:1]`` for a one-device baseline).
    """
    devices = list(jax.devices() if devices is None else devices)
    axes = dict(axes or {"data": len(devices)})
    if axis_types not in ("auto", "explicit"):
        raise ValueError(f"make_mesh(axis_types={axis_types!r}): use 'auto' or 'explicit'")
    free = [k for k, v in axes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: only one axis size may be -1, got {axes}")
    known = int(np.prod([v for v in axes.values() if v != -1]))
    if free:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not divide by {known} ({axes})")
        axes[free[0]] = len(devices) // known
    if int(np.prod(list(axes.values()))) != len(devices):
        raise ValueError(f"make_mesh: axis sizes {axes} multiply to {int(np.prod(list(axes.values())))}, "
                         f"but there are {len(devices)} devices")
    kind = AxisType.Explicit if axis_types == "explicit" else AxisType.Auto
    shape = tuple(axes.values())
    if len(devices) == len(jax.devices()) and devices == list(jax.devices()):
        return jax.make_mesh(shape, tuple(axes), axis_types=(kind,) * len(axes))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axes),
                axis_types=(kind,) * len(axes))


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def is_explicit(mesh: Mesh) -> bool:
    """Whether any axis of ``mesh`` is Explicit (shardings live in array types)."""
    return any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def mesh_state(mesh: Mesh) -> dict:
    """A picklable description of ``mesh`` (device ids, axis names and types)."""
    return {"ids": np.vectorize(lambda d: d.id, otypes=[int])(mesh.devices).tolist(),
            "names": tuple(mesh.axis_names),
            "types": tuple(str(t).split(".")[-1] for t in getattr(mesh, "axis_types", ()))}


def mesh_from_state(state: dict) -> Mesh:
    """Rebuilds a mesh described by :func:`mesh_state` on this process's devices."""
    by_id = {d.id: d for d in jax.devices()}
    ids = np.asarray(state["ids"])
    missing = sorted(set(ids.ravel().tolist()) - set(by_id))
    if missing:
        raise ValueError(f"the mesh was made on devices {sorted(ids.ravel().tolist())}; this process "
                         f"sees {sorted(by_id)} (missing {missing[:8]}): rebuild the pass with a mesh "
                         "of this machine's devices")
    devices = np.vectorize(lambda i: by_id[int(i)], otypes=[object])(ids)
    types = tuple(getattr(AxisType, t) for t in state["types"]) if state["types"] else None
    return Mesh(devices, state["names"], axis_types=types)
