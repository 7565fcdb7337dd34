"""Model adapters: every supported kind of model as one pure function plus a params pytree.

Downstream of this module nothing knows which framework a model came from. An adapter turns a
model into a :class:`ModelSpec` with

- ``params``: the pytree passes rewrite (paths as ``jax.tree_util.keystr`` writes them),
- ``state``: everything else the model carries and may update (Flax NNX batch statistics, RNG
  counters, caches); threaded through, never lost,
- ``pure(method)``: a function ``(params, state, args, kwargs) -> (output, new_state)``.

Supported kinds:

- ``"fn"``: any ``fn(params, *args, **kwargs)`` with ``params=`` given (a Flax Linen
  ``module.apply`` with its variables is this kind too; a Linen module object is accepted and
  its ``apply`` used);
- ``"nnx"``: a Flax NNX module. Params are its ``nnx.Param`` variables as a pure nested dict
  (``nnx.to_pure_dict``); every other variable is state;
- ``"pytree"``: an Equinox module or any callable pytree of arrays. Params are the array leaves
  (the pytree with non-array leaves set to None, as ``eqx.partition`` does); the rest is static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

import jax

from jaxpass.core.program import keystr


class ModelError(TypeError):
    """The model or its params cannot be taken as given; the message says what is accepted."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    kind: str
    params: Any
    state: Any
    make_pure: Callable[[str | None], Callable]
    description: str = ""
    model: Any = None          # the model as given (never mutated), e.g. for its init_cache

    def pure(self, method: str | None = None) -> Callable:
        return self.make_pure(method)


def _is_array_like(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, np.generic))


def check_param_leaves(params, what: str = "params") -> None:
    """Every leaf of a params pytree must be an array (or ShapeDtypeStruct)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not _is_array_like(leaf):
            raise ModelError(
                f"{what}{keystr(path)} is a {type(leaf).__name__} ({leaf!r:.60}), not an array: "
                "params leaves must be jax/numpy arrays or jax.ShapeDtypeStruct. Convert it with "
                "jnp.asarray, or move it out of the params (into a closure or a static field).")


def _is_nnx_module(model) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nnx.Module)


def _is_linen_module(model) -> bool:
    try:
        import flax.linen as nn
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, nn.Module)


def adapt(model, params=None) -> ModelSpec:
    """The :class:`ModelSpec` of ``model`` (see the module docstring for accepted kinds)."""
    if _is_nnx_module(model):
        if params is not None:
            raise ModelError("params= is not used with a Flax NNX module: its nnx.Param "
                             "variables are the params. Pass the module alone.")
        return dataclasses.replace(_nnx_spec(model), model=model)
    if _is_linen_module(model):
        if params is None:
            raise ModelError("a Flax Linen module needs its variables: transform(module, "
                             "params=variables, ...) (or pass module.apply with params=).")
        return dataclasses.replace(_fn_spec(model.apply, params, f"linen {type(model).__name__}.apply"),
                                   model=model)
    if params is not None:
        if not callable(model):
            raise ModelError(f"model must be callable as model(params, *args); got {type(model).__name__}")
        return dataclasses.replace(_fn_spec(model, params, getattr(model, "__name__", type(model).__name__)),
                                   model=model)
    leaves = jax.tree_util.tree_leaves(model)
    if callable(model) and any(_is_array_like(x) for x in leaves):
        return dataclasses.replace(_pytree_spec(model), model=model)
    if callable(model):
        raise ModelError(
            f"{getattr(model, '__name__', type(model).__name__)} is a plain function with no "
            "params: pass params=..., so that weights are parameters (a function that closes over "
            "its weights has only constants, which passes cannot rewrite).")
    raise ModelError(f"cannot transform a {type(model).__name__}: expected a function of params "
                     "(with params=), a Flax NNX module, or an Equinox module / callable pytree.")


def _fn_spec(fn, params, description) -> ModelSpec:
    check_param_leaves(params)

    def make_pure(method):
        if method not in (None, "__call__"):
            raise ModelError(f"a function model has no method {method!r}")

        def pure(params, state, args, kwargs):
            return fn(params, *args, **kwargs), state
        return pure

    return ModelSpec("fn", params, (), make_pure, description)


def _nnx_spec(module) -> ModelSpec:
    from flax import nnx

    graphdef, pstate, rstate = nnx.split(module, nnx.Param, ...)
    params = nnx.to_pure_dict(pstate)
    state = nnx.to_pure_dict(rstate)
    check_param_leaves(params)
    p_def = jax.tree_util.tree_structure(pstate)
    r_def = jax.tree_util.tree_structure(rstate)
    params_def = jax.tree_util.tree_structure(params)
    state_def = jax.tree_util.tree_structure(state)
    # to_pure_dict keeps leaf order; check it so that unflattening is exact.
    if [id(x) for x in jax.tree_util.tree_leaves(pstate)] != [id(x) for x in jax.tree_util.tree_leaves(params)]:
        raise ModelError("internal: nnx.to_pure_dict reordered the params; please report this")

    def make_pure(method):
        def pure(params, state, args, kwargs):
            p = p_def.unflatten(params_def.flatten_up_to(params))
            r = r_def.unflatten(state_def.flatten_up_to(state))
            m = nnx.merge(graphdef, p, r)
            fn = m if method in (None, "__call__") else getattr(m, method)
            out = fn(*args, **kwargs)
            _, _, new_r = nnx.split(m, nnx.Param, ...)
            return out, nnx.to_pure_dict(new_r)
        return pure

    return ModelSpec("nnx", params, state, make_pure, f"nnx {type(module).__name__}")


def _pytree_spec(model) -> ModelSpec:
    leaves, treedef = jax.tree_util.tree_flatten(model)
    is_param = [_is_array_like(x) for x in leaves]
    params = treedef.unflatten([x if m else None for x, m in zip(leaves, is_param)])
    static = [None if m else x for x, m in zip(leaves, is_param)]

    def make_pure(method):
        def pure(params, state, args, kwargs):
            p_leaves = jax.tree_util.tree_flatten(params, is_leaf=lambda x: x is None)[0]
            full = [p if m else s for p, s, m in zip(p_leaves, static, is_param)]
            m = treedef.unflatten(full)
            fn = m if method in (None, "__call__") else getattr(m, method)
            return fn(*args, **kwargs), state
        return pure

    return ModelSpec("pytree", params, (), make_pure, f"pytree {type(model).__name__}")


def pure_method(model_or_transformed, method: str | None = None):
    """``(fn, params, state)`` with ``fn(params, state, *args) -> (output, new_state)`` computing
    ``getattr(model, method)(*args)``; for a transformed model, with its passes applied.

    This is how code that drives a model step by step (``models.generate``) treats an NNX
    module and a ``jaxpass.transform`` result alike.
    """
    from jaxpass.transform import Transformed  # late: transform builds on this module

    if isinstance(model_or_transformed, Transformed):
        t = model_or_transformed
        return t.pure_fn(method), t.params, t.state
    spec = adapt(model_or_transformed)
    pure = spec.pure(method)
    return (lambda params, state, *args: pure(params, state, args, {})), spec.params, spec.state
