"""The Pass protocol.

A pass is a small immutable, picklable object (think an optax ``GradientTransformation``) with one
method, ``run(program) -> PassResult``:

- ``params``: the parameter leaves it replaces, by path, with their new values (arrays or
  structured values: int8 data plus scales, 2:4 values plus indices);
- ``rules``: how the program's equations change, as handlers keyed by primitive name
  (:class:`~jaxpass.core.interpreter.Rules`). Rules must not depend on the example shapes: the
  same rules re-specialize the program when it is later called at other shapes;
- ``report``: what it matched, changed, skipped and why;
- ``inputs`` (optional): how the program's *inputs* change (a KV-compression pass makes the cache
  that ``forward_cached`` takes a different, smaller pytree; ``Transformed.init_cache`` builds it).

``order`` places a pass in the pipeline (weights are sparsified before they are quantized,
quantized before they are sharded, and lowered to kernels last); the pass manager refuses a list
that breaks it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol, runtime_checkable

from jaxpass.core.interpreter import Rules
from jaxpass.core.report import PassReport

# Pipeline stages, in the order passes must appear.
ORDER_SPARSIFY = 10
ORDER_QUANTIZE = 20
ORDER_KV = 30
ORDER_SHARD = 40
ORDER_LOWER = 50


class PassError(ValueError):
    """A pass cannot apply as configured; the message names the parameter, op or rule at fault."""


@dataclasses.dataclass
class PassResult:
    params: dict[str, Any]
    rules: Rules
    report: PassReport
    #: Expected bound on the relative output error the pass introduces (for the numerics check).
    tolerance: float | None = None
    #: For passes that change a model's *inputs* (a compressed KV cache): an object with
    #: ``init_cache(trace, dense_cache) -> cache`` that builds the input the rewritten program
    #: takes from the model's own (abstract) one. ``trace(method, *args)`` traces the original
    #: model. The structured values it puts in the cache are fed to this pass's rules when the
    #: program is re-specialized (see :func:`jaxpass.core.manager.replay`).
    inputs: Any = None


@runtime_checkable
class Pass(Protocol):
    order: ClassVar[int]

    def run(self, program) -> PassResult: ...
