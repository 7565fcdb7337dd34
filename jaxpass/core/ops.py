"""Named operations: small JAX primitives that stay visible in a jaxpr.

jaxpass marks the operations it inserts (a quantized matmul, a KV-cache update) and the operations
a model wants passes to find (attention over a cache) as *named ops*. A named op is a primitive
named ``jaxpass.<name>`` whose static keyword arguments appear as equation params, so
``print(jaxpr)`` shows ``jaxpass.quantized_matmul[bits=4 group_size=128 ...]`` and a later pass
pattern-matches on the name and params. Its meaning is its ``impl``: an ordinary JAX function,
used for lowering (inlined), differentiation (``jax.jvp`` of the impl), batching (``jax.vmap``
of the impl) and shape inference. A pass that wants another implementation (a Pallas kernel)
replaces the equation; it never changes what the op means.

Usage::

    def _attend(q, k, v, *, causal):  # arrays positional, static params as keywords
        ...
    attend = define_op("attention", _attend)
    y = attend(q, k, v, causal=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


from jaxpass.core import compat

OP_PREFIX = "jaxpass."


@dataclasses.dataclass(frozen=True)
class NamedOp:
    """A named op: call it with arrays positionally and static params as keywords."""

    name: str
    impl: Callable[..., Any]
    primitive: Any
    multiple_results: bool

    def __call__(self, *arrays, **params):
        for key, value in params.items():
            try:
                hash(value)
            except TypeError as e:
                raise TypeError(
                    f"named op {self.name!r}: static parameter {key}={value!r} must be hashable "
                    "(use a tuple instead of a list)") from e
        out = self.primitive.bind(*arrays, **params)
        return tuple(out) if self.multiple_results else out

    def __repr__(self):
        return f"NamedOp({self.primitive.name})"


_REGISTRY: dict[str, NamedOp] = {}


def define_op(name: str, impl: Callable[..., Any], *, multiple_results: bool = False) -> NamedOp:
    """Defines (or returns the existing) named op ``jaxpass.<name>`` with meaning ``impl``.

    ``impl(*arrays, **params)`` must be a traceable JAX function returning one array, or a tuple
    of arrays when ``multiple_results`` is set.
    """
    full = name if name.startswith(OP_PREFIX) else OP_PREFIX + name
    if full in _REGISTRY:
        existing = _REGISTRY[full]
        if existing.impl is not impl:
            raise ValueError(f"named op {full!r} is already defined with another implementation")
        return existing
    prim = compat.make_primitive(full, impl, multiple_results=multiple_results)
    op = NamedOp(full, impl, prim, multiple_results)
    _REGISTRY[full] = op
    return op


def lookup(name: str) -> NamedOp | None:
    """The named op called ``name`` (with or without the ``jaxpass.`` prefix), if defined."""
    full = name if name.startswith(OP_PREFIX) else OP_PREFIX + name
    return _REGISTRY.get(full)
