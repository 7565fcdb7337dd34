"""Presets: "dp", "fsdp", "tp" and "fsdp+tp", as logical axis names plus logical axis rules.

Every parameter gets one *logical* name per axis, from how the program uses it (provenance: which
axes its matmuls contract, which axis a scan over layers slices) and, for the Megatron split,
from its path:

========================  ==============================================  =====================
parameter                 how it is recognised                            logical axes
========================  ==============================================  =====================
column-parallel matmul    path matches ``COLUMN`` (q/k/v, gate/up,        contracting: "embed",
                          c_attn, c_fc, fc1, lm_head, ...), or any        output: "mlp"
                          matmul weight no other rule names               ("vocab" for lm_head)
row-parallel matmul       path matches ``ROW`` (o_proj, down_proj, wo,    contracting: "mlp",
                          w2, c_proj, out_proj, fc2, ...)                 output: "embed"
embedding table           path matches ``EMBEDDING`` (embed, wte, ...)    ("vocab", "embed")
stacked layers            the axis a scan over layers slices              "layers"
other arrays (>= 2-D)     e.g. conv kernels, stacked norm scales          largest axis: "embed"
vectors, scalars          norms, biases                                   replicated
========================  ==============================================  =====================

The presets map logical names to the mesh axes below (a preset whose axis is missing from the
mesh is refused; ``Shard(logical_axis_rules=...)`` overrides single entries):

- ``"dp"``: batch over ``"data"``; parameters replicated.
- ``"fsdp"``: batch over ``("data", "fsdp")`` (those the mesh has); "embed" over ``"fsdp"``
  (ZeRO-3: each device stores ``1/n`` of every weight; XLA gathers one weight, one layer at a
  time, where it is used). A weight whose "embed" axis does not divide is sharded along its
  largest dividing axis instead (noted in the report).
- ``"tp"``: Megatron: "mlp", "heads", "kv_heads" and "vocab" over ``"tensor"``; batch over
  ``"data"`` when the mesh has it. Column-parallel outputs stay sharded over ``"tensor"`` into the
  row-parallel matmul, whose partial sums XLA all-reduces.
- ``"fsdp+tp"``: both.
"""

from __future__ import annotations

import re

from jaxpass.core.pass_api import PassError

PRESETS = ("dp", "fsdp", "tp", "fsdp+tp")

COLUMN = (r"q_proj|k_proj|v_proj|gate_proj|up_proj|\bwq\b|\bwk\b|\bwv\b|'w1'|'w3'|query|key'|value|"
          r"c_attn|c_fc|fc1|fc_in|qkv|lm_head|'wi'|in_proj|gate|'up'")
ROW = r"o_proj|down_proj|'wo'|'w2'|c_proj|out_proj|fc2|fc_out|dense_4h_to_h|'down'|'out'"
EMBEDDING = r"embed|'wte'|'wpe'|tok_emb|embedding"
LM_HEAD = r"lm_head|'head'|unembed"

#: Mesh axes each preset needs, and the logical axis rules it applies.
REQUIRED = {"dp": ("data",), "fsdp": ("fsdp",), "tp": ("tensor",), "fsdp+tp": ("fsdp", "tensor")}


def preset_rules(preset: str, mesh_axes: dict[str, int]) -> list[tuple[str, tuple]]:
    """The logical axis rules of ``preset`` on a mesh with ``mesh_axes``."""
    if preset not in PRESETS:
        raise PassError(f"Shard(preset={preset!r}): presets are {PRESETS}")
    missing = [a for a in REQUIRED[preset] if a not in mesh_axes]
    if missing:
        raise PassError(f"Shard(preset={preset!r}) shards over mesh axes {REQUIRED[preset]}; the "
                        f"mesh has {tuple(mesh_axes)} (missing {missing}). Build it with e.g. "
                        f"jaxpass.sharding.make_mesh({{{', '.join(repr(a) + ': n' for a in REQUIRED[preset])}}})")
    fsdp = "fsdp" in preset
    tp = "tp" in preset
    batch = tuple(a for a in ("data", "fsdp") if a in mesh_axes and (a == "data" or fsdp))
    tensor = ("tensor",) if tp else ()
    return [("batch", batch), ("embed", ("fsdp",) if fsdp else ()), ("mlp", tensor),
            ("heads", tensor), ("kv_heads", tensor), ("vocab", tensor), ("layers", ())]


def logical_axes(path: str, shape: tuple, use: dict | None) -> tuple:
    """Logical names of the axes of parameter ``path`` (see the module docstring).

    ``use``: from the program's matmuls on this parameter: ``contracting`` and ``free``
    (parameter axes) and ``sliced`` (axes a scan or loop indexes); None if it feeds no matmul.
    """
    ndim = len(shape)
    names: list = [None] * ndim
    if ndim == 0:
        return ()
    sliced = set(use.get("sliced", ())) if use else set()
    if not use and ndim >= 3 and re.search(r"layers|blocks|'h'", path):
        sliced = {0}  # stacked per-layer weights that a non-matmul use reads
    for a in sliced:
        names[a] = "layers"
    rest = [a for a in range(ndim) if a not in sliced]
    if len(rest) < 1:
        return tuple(names)
    if re.search(EMBEDDING, path) and len(rest) == 2:
        names[rest[0]], names[rest[1]] = "vocab", "embed"
        return tuple(names)
    if use and use.get("contracting"):
        contracting = [a for a in rest if a in use["contracting"]]
        free = [a for a in rest if a in use["free"]]
        row = bool(re.search(ROW, path)) and not re.search(COLUMN, path)
        big = lambda axes: max(axes, key=lambda a: shape[a]) if axes else None
        c, f = big(contracting), big(free)
        out_name = "vocab" if re.search(LM_HEAD, path) else "mlp"
        if c is not None:
            names[c] = "mlp" if row else "embed"
        if f is not None:
            names[f] = "embed" if row else out_name
        return tuple(names)
    if len(rest) == 2 and (re.search(COLUMN, path) or re.search(ROW, path)):
        # A linear kernel whose matmul provenance is hidden (e.g. behind training-mode fake
        # quantization): the ``[in, out]`` layout of Flax / jaxpass.models kernels.
        row = bool(re.search(ROW, path)) and not re.search(COLUMN, path)
        names[rest[0]], names[rest[1]] = ("mlp", "embed") if row else ("embed", "mlp")
        return tuple(names)
    if len(rest) >= 2:
        names[max(rest, key=lambda a: shape[a])] = "embed"
    return tuple(names)
