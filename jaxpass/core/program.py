"""A traced program with named inputs: what a pass reads.

A :class:`Program` is one stage of the pipeline: the closed jaxpr of the model at this stage, the
params pytree it takes (arrays, ShapeDtypeStructs, or structured values made by earlier passes),
the example inputs it was traced at, and lazily computed analyses (provenance). Passes read a
Program and return a :class:`~jaxpass.core.pass_api.PassResult`; they never mutate it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxpass.core import compat
from jaxpass.core.provenance import Provenance
from jaxpass.core.values import is_structured


def keystr(path) -> str:
    return jax.tree_util.keystr(tuple(path))


def leaves_with_paths(tree) -> list[tuple[str, Any]]:
    """(keystr path, leaf) for every array leaf, structured values flattened."""
    return [(keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract(tree):
    """The tree with every array (or Python scalar) replaced by a ShapeDtypeStruct."""
    def to_sds(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        aval = compat.aval_of(x)
        sharding = None
        if isinstance(x, jax.Array) and not compat.is_tracer(x):
            sharding = x.sharding
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding,
                                    weak_type=bool(getattr(aval, "weak_type", False)))
    return jax.tree_util.tree_map(to_sds, tree)


def is_concrete(tree) -> bool:
    return all(not isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Example inputs a program is traced at (everything but the params)."""

    state: Any
    args: tuple
    kwargs: dict

    def flat(self) -> list:
        return jax.tree_util.tree_leaves((self.state, self.args, self.kwargs))


@dataclasses.dataclass(frozen=True)
class Program:
    closed: Any                      # closed jaxpr: (param leaves, state, args, kwargs) -> flat outs
    params: Any                      # the params pytree this stage takes
    inputs: Inputs
    out_tree: Any                    # treedef of (output, new_state)
    calibration_data: Any = None
    mode: str = "inference"
    #: For each param leaf path: the passes that made it, in order.
    history: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def param_leaves(self) -> list[tuple[str, Any]]:
        return leaves_with_paths(self.params)

    @property
    def param_paths(self) -> list[str]:
        return [p for p, _ in self.param_leaves]

    @functools.cached_property
    def provenance(self) -> Provenance:
        return Provenance(self.closed, self.param_paths)

    @property
    def jaxpr(self):
        return compat.jaxpr_of(self.closed)

    @property
    def consts(self) -> list:
        return compat.consts_of(self.closed)

    def param(self, path: str):
        for p, x in self.param_leaves:
            if p == path:
                return x
        raise KeyError(f"no parameter {path!r}; parameters are {self.param_paths[:8]}...")

    def structured_params(self) -> list[tuple[str, Any]]:
        """(path, value) of the structured values among the params (made by earlier passes)."""
        out = []
        for p, x in jax.tree_util.tree_flatten_with_path(self.params, is_leaf=is_structured)[0]:
            if is_structured(x):
                out.append((keystr(p), x))
        return out

    @property
    def params_are_concrete(self) -> bool:
        return is_concrete(self.params)

    def out_avals(self) -> list:
        return [compat.aval_of(v) for v in self.jaxpr.outvars]

    def large_constants(self, min_size: int = 1024) -> list[Any]:
        """Closed-over float arrays at least ``min_size`` elements big (weights that should be
        parameters)."""
        import numpy as np
        out = []
        for c in self.consts:
            shape = getattr(c, "shape", ())
            dtype = getattr(c, "dtype", None)
            if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating) and int(np.prod(shape)) >= min_size:
                out.append(c)
        return out
