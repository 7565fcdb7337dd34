"""A model's method as a pure function of (params, state, *args).

``pure_method(model_or_t, name) -> (fn, params, state)`` with ``fn(params, state, *args) ->
(out, new_state)`` computing ``getattr(model, name)(*args)``. The core's adapter
(``jaxpass.core.adapters.pure_method``) does this for every kind of model and for transformed
models (applying the transformation); until it is available this module falls back to
``nnx.split`` / ``nnx.merge`` for plain Flax NNX modules.

Generation and evaluation are written against this contract only, so they never need to know
whether they run a plain or a transformed model.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from flax import nnx

try:  # the core's version handles transformed models; it may not exist yet
    from jaxpass.core.adapters import pure_method as _core_pure_method
except ImportError:  # pragma: no cover - depends on the state of jaxpass.core
    _core_pure_method = None


def pure_method(model: Any, name: str) -> tuple[Callable, Any, Any]:
    """``(fn, params, state)`` such that ``fn(params, state, *args) == (model.name(*args), state')``.

    ``fn`` is the same object for the same model (plain NNX modules: the same graph definition),
    so callers can key jit compilations on it; params and state are read afresh on every call.
    """
    if isinstance(model, nnx.Module):
        graphdef, params, state = nnx.split(model, nnx.Param, ...)
        return _nnx_fn(graphdef, name), params, state
    if _core_pure_method is not None:
        fn, params, state = _core_pure_method(model, name)
        try:
            per_model = _CORE_FNS.setdefault(model, {})
        except TypeError:  # not weak-referenceable: no caching
            return fn, params, state
        return per_model.setdefault(name, fn), params, state
    raise TypeError(
        f"cannot run method {name!r} of {type(model).__name__} purely: expected a Flax NNX module "
        "(a transformed model needs jaxpass.core.adapters.pure_method, which this jaxpass lacks)")


_FNS: dict[tuple[Any, str], Callable] = {}
_CORE_FNS: "weakref.WeakKeyDictionary[Any, dict[str, Callable]]" = weakref.WeakKeyDictionary()


def _nnx_fn(graphdef, name: str) -> Callable:
    key = (graphdef, name)
    if key not in _FNS:
        def fn(params, state, *args):
            module = nnx.merge(graphdef, params, state)
            out = getattr(module, name)(*args)
            _, _, new_state = nnx.split(module, nnx.Param, ...)
            return out, new_state
        _FNS[key] = fn
    return _FNS[key]
