"""``jaxpass.transform``: trace a model, run passes, return an ordinary JAX callable."""

from __future__ import annotations

import dataclasses
import threading
from typing import Iterable, Sequence

import jax

from jaxpass.core import compat
from jaxpass.core.adapters import ModelError, adapt
from jaxpass.core.graph import Graph
from jaxpass.core.manager import (Stage, dense_standins, has_structured, replay, run_passes,
                                  split_kwargs, trace_model)
from jaxpass.core.program import Inputs, Program, abstract, is_concrete
from jaxpass.core.report import Report
from jaxpass.core.values import masters, tree_nbytes

_NUMERICS_CHECK_MAX_BYTES = 2 << 30


def _signature(tree) -> tuple:
    """Cache key of a call's inputs: structure, shapes, dtypes and weak types."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract(tree))
    return (treedef,) + tuple((x.shape, str(x.dtype), bool(x.weak_type)) for x in leaves)


def _evaluator(closed):
    """The program as a function of its flat inputs. Eager calls run it compiled; under an outer
    trace (jit, grad, vmap) its equations are bound inline, exactly as the original model's
    would be, so ``passes=[]`` stays bit-identical in outputs and gradients."""
    def run(*flat):
        return compat.eval_closed(closed, *flat)
    run.__name__ = "jaxpass_program"
    compiled = jax.jit(run)

    def evaluate(*flat):
        if any(compat.is_tracer(x) for x in flat):
            return run(*flat)
        return compiled(*flat)
    return evaluate


class Transformed:
    """A transformed model: call it, or use its pure function with its params.

    - ``t(*args)`` runs the rewritten model with ``t.params`` (and updates ``t.state`` for models
      that carry state, such as Flax NNX batch statistics, when called outside a trace);
    - ``t.apply(params, *args)`` is pure and works under ``jax.jit``, ``jax.grad``, ``jax.vmap``
      and sharding; it re-specializes the rewritten program for new input shapes by replaying the
      passes' rules (the params transforms are never recomputed);
    - ``t.params``: the new params pytree; ``t.state``: non-parameter model state;
    - ``t.report``: what each pass did; ``t.graph``: the rewritten program, printable;
    - ``t.method(name)``: the same for another method of a module (e.g. a cached decode step).
    """

    def __init__(self, spec, passes, stages: list[Stage], final: Program, report: Report,
                 params0_abstract, method: str | None = None, static_kw: tuple = ()):
        self._spec = spec
        self.passes = tuple(passes)
        self._stages = stages
        self._final = final
        self._params0 = params0_abstract
        self._method = method
        self._params_treedef = jax.tree_util.tree_structure(final.params)
        self._static_kw = static_kw
        self.params = final.params
        self.state = final.inputs.state
        self.report = report
        self._lock = threading.Lock()
        self._cache: dict = {}
        key = self._key(final.inputs.state, final.inputs.args, final.inputs.kwargs, static_kw)
        self._cache[key] = (_evaluator(final.closed), final.out_tree)

    # -- views -------------------------------------------------------------------------------------
    @property
    def graph(self) -> Graph:
        names = ", ".join(type(p).__name__ for p in self.passes) or "no passes"
        return Graph(self._final, f"jaxpass program ({names})")

    @property
    def program(self) -> Program:
        return self._final

    @property
    def model(self):
        """The model as it was given to ``transform`` (untouched); e.g. ``t.model.init_cache``."""
        return self._spec.model

    def pure_fn(self, method: str | None = None):
        """``fn(params, state, *args) -> (output, new_state)`` for a method, the same function
        object on every call (so callers can key their jit caches on it)."""
        key = method or "__call__"
        fns = self.__dict__.setdefault("_pure_fns", {})
        if key not in fns:
            t = self if key == "__call__" else self.method(key)
            fns[key] = lambda params, state, *args: t.apply_with_state(params, state, *args)
        return fns[key]

    def method(self, name: str) -> "Transformed":
        """The same transformation applied to another method of the model (e.g. decode)."""
        t = Transformed.__new__(Transformed)
        t.__dict__.update(self.__dict__)
        t._method = name
        t._cache = {}
        t._pure_fns = {}
        t._lock = threading.Lock()
        return t

    def finalize(self, params=None, *, passes: Sequence | None = None,
                 calibration_data: Iterable | None = None) -> "Transformed":
        """The inference model after quantization-/sparsity-aware training.

        Takes trained params of a ``mode="train"`` transform (``t.params`` after optax updates;
        default: ``self.params``), turns every trainable value back into its float master weight
        (masked where a sparsity mask applies) and runs ``passes`` (default: the same passes) in
        inference mode on the model with those weights: fake quantization becomes real packed
        codes and scales, masks become sparse storage. ``self`` is left unchanged.
        """
        if self._final.mode != "train":
            raise ValueError("finalize() is for transforms made with mode='train'; this one is "
                             f"mode={self._final.mode!r}")
        params = self.params if params is None else params
        if jax.tree_util.tree_structure(params) != self._params_treedef:
            raise ModelError("finalize(params=...) must have the structure of t.params")
        spec = dataclasses.replace(self._spec, params=masters(params), state=self.state)
        inputs = self._final.inputs
        return _build(spec, list(self.passes if passes is None else passes), tuple(inputs.args),
                      {**dict(inputs.kwargs), **dict(self._static_kw)}, calibration_data,
                      "inference", None)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        """The KV cache the transformed ``forward_cached`` takes: the model's own
        ``init_cache(batch, max_len, dtype)`` as rebuilt by the passes that change it
        (``passes.CompressKV`` makes it a smaller pytree of compressed values), else the model's."""
        model = self._spec.model
        if model is None or not hasattr(model, "init_cache"):
            raise ModelError(f"{self._spec.description} has no init_cache(batch, max_len, dtype=None): "
                             "KV-cached generation needs a model with an explicit cache "
                             "(see docs/models.md, 'The KV-cache contract')")
        builders = [st.inputs for st in self._stages if st.inputs is not None]
        if not builders:
            return model.init_cache(batch, max_len, dtype=dtype)
        cache = jax.eval_shape(lambda: model.init_cache(batch, max_len, dtype=dtype))

        def trace(method, *args):
            return trace_model(self._spec, method, self._params0, abstract(self.state),
                               abstract(tuple(args)), {})

        for builder in builders:
            cache = builder.init_cache(trace, cache)
        return cache

    # -- running -----------------------------------------------------------------------------------
    def _key(self, state, args, kwargs, static_kw):
        return (self._method, _signature((state, tuple(args), kwargs)), static_kw)

    def _specialize(self, state, args, kwargs, static_kw):
        key = self._key(state, args, kwargs, static_kw)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        feed = None
        if has_structured((state, tuple(args), kwargs)):
            # A compressed input (a KV cache from t.init_cache): trace the original model at the
            # dense values it stands for; the pass that made it takes it during the replay.
            feed = Inputs(abstract(state), abstract(tuple(args)), abstract(kwargs))
            state, args, kwargs = dense_standins((state, tuple(args), kwargs))
        prog = trace_model(self._spec, self._method, self._params0, abstract(state),
                           abstract(tuple(args)), {**abstract(kwargs), **dict(static_kw)})
        prog = replay(prog, self._stages, feed)
        entry = (_evaluator(prog.closed), prog.out_tree)
        with self._lock:
            self._cache[key] = entry
        return entry

    def apply_with_state(self, params, state, *args, **kwargs):
        """``(output, new_state)`` of the rewritten model (pure)."""
        if jax.tree_util.tree_structure(params) != self._params_treedef:
            raise ModelError("params do not have the structure of t.params "
                             f"(expected {self._params_treedef}, got {jax.tree_util.tree_structure(params)})")
        traced_kw, static_kw = split_kwargs(kwargs)
        run, out_tree = self._specialize(state, args, traced_kw, static_kw)
        flat = jax.tree_util.tree_leaves(params) + Inputs(state, tuple(args), traced_kw).flat()
        outs = run(*flat)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    def apply(self, params, *args, **kwargs):
        """The rewritten model's output, with ``self.state`` as the model state (pure)."""
        out, _ = self.apply_with_state(params, self.state, *args, **kwargs)
        return out

    def __call__(self, *args, **kwargs):
        out, new_state = self.apply_with_state(self.params, self.state, *args, **kwargs)
        if not any(compat.is_tracer(x) for x in jax.tree_util.tree_leaves(new_state)):
            self.state = new_state
        return out

    def __repr__(self) -> str:
        names = ", ".join(repr(p) for p in self.passes) or "no passes"
        return f"Transformed({self._spec.description}; {names})"


def transform(model, passes: Sequence = (), *, params=None, example_args: Sequence = (),
              example_kwargs: dict | None = None, calibration_data: Iterable | None = None,
              mode: str = "inference", check_numerics: bool | None = None) -> Transformed:
    """Traces ``model`` at ``example_args`` and applies ``passes`` in order.

    Args:
      model: a function ``fn(params, *args, **kwargs)`` (give ``params=``; a Flax Linen
        ``module.apply`` with its variables is one), a Flax NNX module, or an Equinox module /
        callable pytree of arrays.
      passes: pass objects from :mod:`jaxpass.passes`; ``[]`` is the identity.
      params: the params pytree of a function model. Leaves may be ``jax.ShapeDtypeStruct``
        (abstract transform: nothing is allocated).
      example_args / example_kwargs: inputs to trace at (arrays or ShapeDtypeStructs). Later
        calls may use other shapes: the program is re-specialized.
      calibration_data: an iterable of argument tuples, for passes that need activation
        statistics (GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT).
      mode: ``"inference"`` (default) or ``"train"`` (quantization-/sparsity-aware training: the
        transformed function stays differentiable in the float params).
      check_numerics: run the program before and after each pass on the example inputs and record
        the relative output error in the report. Default: on when params and inputs are concrete
        and params are under 2 GiB.

    Nothing passed in is mutated.
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    spec = adapt(model, params)
    return _build(spec, list(passes), tuple(example_args), dict(example_kwargs or {}),
                  calibration_data, mode, check_numerics)


def transform_abstract(model, passes: Sequence = (), *, params=None, example_args=(),
                       example_kwargs=None, mode: str = "inference") -> Transformed:
    """``transform`` on the model's abstract params (shapes only): the rewritten program and the
    structure of the new params, without computing them. ``jaxpass.load`` fills them in."""
    spec = adapt(model, params)
    spec = dataclasses.replace(spec, params=abstract(spec.params), state=abstract(spec.state))
    return _build(spec, list(passes), tuple(example_args), dict(example_kwargs or {}), None, mode, False)


def _build(spec, passes, example_args, example_kwargs, calibration_data, mode, check_numerics):
    if calibration_data is not None:
        calibration_data = [tuple(c) if isinstance(c, (tuple, list)) else (c,) for c in calibration_data]
    prog = trace_model(spec, None, spec.params, spec.state, example_args, example_kwargs,
                       calibration_data=calibration_data, mode=mode)
    if check_numerics is None:
        check_numerics = (bool(passes) and is_concrete((spec.params, spec.state, example_args, example_kwargs))
                          and tree_nbytes(spec.params) <= _NUMERICS_CHECK_MAX_BYTES)
    final, stages, report = run_passes(prog, passes, check_numerics=check_numerics)
    return Transformed(spec, passes, stages, final, report, abstract(spec.params),
                       static_kw=split_kwargs(example_kwargs)[1])
