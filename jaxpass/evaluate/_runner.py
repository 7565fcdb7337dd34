"""A jitted ``ids -> logits`` function for a plain or transformed model."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from jaxpass.models.pure import pure_method


def logits_fn(model: Any) -> Callable:
    """``f(ids) -> logits``: the model's ``__call__`` as a jitted pure function where possible
    (NNX modules, transformed models), else the callable itself (any ``m(ids) -> logits``)."""
    try:
        fn, params, state = pure_method(model, "__call__")
    except TypeError:
        if not callable(model):
            raise TypeError(f"{type(model).__name__} is not callable as model(ids) -> logits")
        return model
    jitted = _jit(fn)
    return lambda ids: jitted(params, state, ids)[0]


@functools.lru_cache(maxsize=32)
def _jit(fn):
    return jax.jit(fn)
