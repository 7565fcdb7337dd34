"""The pass manager: traces a model, runs passes in order, verifies every stage.

Each pass sees the program the previous pass produced (so LowerToPallas finds the quantized
matmuls Quantize inserted). After each pass the manager

1. builds the new params pytree from the pass's replacements (nothing the user passed is changed),
2. re-traces the program through the rewriting interpreter with the pass's rules,
3. type-checks the new jaxpr and checks that outputs keep their shapes and dtypes,
4. optionally runs both programs on the example inputs and records the relative output error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.adapters import ModelSpec
from jaxpass.core.interpreter import EventLog, Interpreter, Rules
from jaxpass.core.pass_api import PassError, PassResult
from jaxpass.core.program import Inputs, Program, abstract, keystr
from jaxpass.core.report import ParamChange, Report
from jaxpass.core.values import ComponentView, is_structured, leaf_nbytes


class VerificationError(RuntimeError):
    """A pass produced a program that does not type-check or changes output shapes/dtypes."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """What a pass decided, kept so the program can be re-specialized at other shapes."""

    name: str
    rules: Rules
    params_after: Any       # abstract params pytree after the pass
    replaced_nodes: frozenset = frozenset()  # structured nodes the pass replaced whole
    inputs: Any = None      # PassResult.inputs: how the pass changes the program's inputs


def split_kwargs(kwargs: dict) -> tuple[dict, tuple]:
    """Array-valued kwargs are traced; the others are static (hashable, part of the cache key)."""
    traced, static = {}, []
    for k, v in sorted(kwargs.items()):
        if any(isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for x in jax.tree_util.tree_leaves(v)):
            traced[k] = v
        else:
            static.append((k, v))
    return traced, tuple(static)


def trace_model(spec: ModelSpec, method, params, state, args, kwargs, **program_kw) -> Program:
    """Stage 0: the model traced at the given inputs."""
    traced_kw, static_kw = split_kwargs(dict(kwargs))
    pure = spec.pure(method)

    def fn(p, s, a, k):
        out, new_state = pure(p, s, a, {**k, **dict(static_kw)})
        return out, new_state

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, state, tuple(args), traced_kw)
    out_tree = jax.tree_util.tree_structure(out_shape)
    return Program(closed, params, Inputs(state, tuple(args), traced_kw), out_tree, **program_kw)


def _leave_program(value):
    """A program output as the rewritten program returns it: arrays as they are; a structured
    value that may be an output (a compressed KV cache, ``at_program_output``) in its own form;
    any other structured value dense, so the output structure is unchanged."""
    if not is_structured(value):
        return value
    exit_hook = getattr(value, "at_program_output", None)
    return exit_hook() if exit_hook is not None else value.materialize()


def retrace(program: Program, rules: Rules, new_params, log: EventLog,
            replaced_nodes: frozenset = frozenset(), inputs: Inputs | None = None) -> Program:
    """The program rewritten by ``rules``, taking ``new_params``.

    ``inputs`` (default: the program's own) may hold structured values where the program has
    dense inputs (a compressed KV cache where the model takes a dense one): each is fed to the
    interpreter whole, in place of the dense input it stands for, and the rewritten program
    takes its leaves; outputs may then be structured too (``at_program_output``), and the
    program's output structure follows.
    """
    to_inputs = _stage_inputs(program.params, replaced_nodes)
    jaxpr, consts = program.jaxpr, program.consts

    def fn(new_params, state, args, kwargs):
        pvals = to_inputs(new_params)
        flat = list(pvals) + jax.tree_util.tree_leaves((state, args, kwargs), is_leaf=is_structured)
        outs = Interpreter(rules, log).run(jaxpr, consts, flat)
        return [_leave_program(o) for o in outs]

    inp = program.inputs if inputs is None else inputs
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(new_params, inp.state, inp.args, inp.kwargs)
    out_tree = jax.tree_util.tree_structure(jax.tree_util.tree_unflatten(program.out_tree, out_shape))
    return dataclasses.replace(program, closed=closed, params=new_params, inputs=inp,
                               out_tree=out_tree)


def evaluate(program: Program, params=None, inputs: Inputs | None = None):
    params = program.params if params is None else params
    inputs = program.inputs if inputs is None else inputs
    flat = jax.tree_util.tree_leaves(params) + inputs.flat()
    return jax.jit(lambda *a: compat.eval_closed(program.closed, *a))(*flat)


def relative_error(outs, ref) -> float:
    num = den = 0.0
    for o, r in zip(outs, ref):
        if not jnp.issubdtype(jnp.result_type(r), jnp.inexact):
            continue
        o = np.asarray(o, np.float64); r = np.asarray(r, np.float64)
        num += float(np.sum((o - r) ** 2)); den += float(np.sum(r ** 2))
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def _describe(x) -> str:
    if is_structured(x):
        return x.describe() if hasattr(x, "describe") else x.format_name
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def check_order(passes: Sequence) -> None:
    for i, p in enumerate(passes):
        if not hasattr(p, "run") or not hasattr(p, "order"):
            raise TypeError(f"passes[{i}] = {p!r} is not a pass (needs .run(program) and .order)")
    for i in range(1, len(passes)):
        for j in range(i):
            if passes[i].order < passes[j].order:
                raise PassError(
                    f"pass order: passes[{i}] {type(passes[i]).__name__} must come before passes[{j}] "
                    f"{type(passes[j]).__name__} (the pipeline order is Sparsify, Quantize, "
                    "CompressKV, Shard, LowerToPallas)")


def _known_nodes(program: Program) -> dict:
    """Every replaceable thing by path: array leaves and structured-value nodes."""
    known = dict(program.param_leaves)
    known.update(program.structured_params())
    return known


def _apply_replacements(program: Program, result: PassResult, pass_name: str):
    known = _known_nodes(program)
    for path, value in result.params.items():
        if path not in known:
            raise PassError(f"{pass_name} replaced unknown parameter {path!r}")
        old = known[path]
        if is_structured(old) and not is_structured(value):
            raise PassError(f"{pass_name} replaced the {old.format_name} node {path} by a plain "
                            "array; a compressed node is replaced by another structured value")
        if not is_structured(value) and tuple(value.shape) != tuple(old.shape):
            raise PassError(f"{pass_name} replaced {path} {tuple(old.shape)} by an array of "
                            f"shape {tuple(value.shape)}; dense replacements must keep the shape")
    repl = result.params

    def replace(path, x):
        key = keystr(path)
        if key in repl:
            return repl[key]
        if is_structured(x):  # single leaves inside a structured value may be replaced too
            return jax.tree_util.tree_map_with_path(lambda p, leaf: repl.get(key + keystr(p), leaf), x)
        return x

    return jax.tree_util.tree_map_with_path(replace, program.params, is_leaf=is_structured)


def _stage_inputs(old_params, replaced_nodes: frozenset):
    """Maps the new params to values for the old program's param inputs: the leaves of a
    replaced structured node become :class:`ComponentView`s of its replacement."""
    treedef = jax.tree_util.tree_structure(old_params)
    if not replaced_nodes:
        return treedef.flatten_up_to

    def views(path, old, new):
        key = keystr(path)
        if key not in replaced_nodes:
            return new
        subs = [keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(old)[0]]
        return jax.tree_util.tree_structure(old).unflatten([ComponentView(new, s) for s in subs])

    def inputs(new_params):
        proxy = jax.tree_util.tree_map_with_path(views, old_params, new_params, is_leaf=is_structured)
        return treedef.flatten_up_to(proxy)

    return inputs


def run_passes(program: Program, passes: Sequence, *, check_numerics: bool) -> tuple[Program, list[Stage], Report]:
    check_order(passes)
    report = Report()
    report.params_bytes_before = sum(leaf_nbytes(x) for _, x in program.param_leaves)
    stages: list[Stage] = []
    for i, p in enumerate(passes):
        name = type(p).__name__
        result = p.run(program)
        if not isinstance(result, PassResult):
            raise TypeError(f"{name}.run must return a PassResult, got {type(result).__name__}")
        new_params = _apply_replacements(program, result, name)
        nodes = frozenset(p for p in result.params if p in dict(program.structured_params()))
        log = EventLog()
        new_program = retrace(program, result.rules, new_params, log, nodes)
        history = dict(program.history)
        for path in result.params:
            history[path] = history.get(path, ()) + (name,)
        new_program = dataclasses.replace(new_program, history=history)
        _verify(program, new_program, name)
        rep = result.report
        rep.events.extend(log.events)
        known = _known_nodes(program)
        if not rep.changed:
            for path, value in result.params.items():
                old = known[path]
                rep.changed.append(ParamChange(path, _describe(old), _describe(value),
                                               leaf_nbytes(old), leaf_nbytes(value)))
        if check_numerics:
            rep.output_error = relative_error(evaluate(new_program), evaluate(program))
            if result.tolerance is not None and rep.output_error > result.tolerance:
                rep.notes.append(f"output error {rep.output_error:.3e} exceeds the pass's expected "
                                 f"bound {result.tolerance:.1e} on the example inputs")
        report.passes.append(rep)
        stages.append(Stage(name, result.rules, abstract(new_params), nodes,
                            getattr(result, "inputs", None)))
        program = new_program
    report.params_bytes_after = sum(leaf_nbytes(x) for _, x in program.param_leaves)
    return program, stages, report


def _verify(before: Program, after: Program, name: str) -> None:
    try:
        compat.check_jaxpr(after.closed)
    except Exception as e:  # JaxprTypeError
        raise VerificationError(f"after {name}: the rewritten program does not type-check: {e}") from e
    b, a = before.out_avals(), after.out_avals()
    if len(a) != len(b) or any(x.shape != y.shape or x.dtype != y.dtype for x, y in zip(a, b)):
        raise VerificationError(
            f"after {name}: outputs changed from {[str(x) for x in b]} to {[str(x) for x in a]}")


def replay(program: Program, stages: Sequence[Stage], inputs: Inputs | None = None) -> Program:
    """Re-applies recorded stages to a freshly traced program (other shapes, other method).

    ``inputs``: the call's real inputs when they hold structured values (a compressed cache); the
    program was traced at the dense values they stand for, and the first stage whose pass makes
    inputs (``Stage.inputs``) takes them.
    """
    pending = inputs
    for st in stages:
        feed = None
        if pending is not None and st.inputs is not None:
            feed, pending = pending, None
        program = retrace(program, st.rules, st.params_after, EventLog(), st.replaced_nodes, feed)
    if pending is not None:
        raise PassError("the inputs hold compressed values (e.g. a compressed KV cache from "
                        "t.init_cache) but no pass of this transform takes such inputs")
    return program


def has_structured(tree) -> bool:
    return any(is_structured(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_structured))


def dense_standins(tree):
    """``tree`` with each structured value replaced by the ShapeDtypeStruct of the dense array it
    stands for (what the original model is traced at)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if is_structured(x) else x,
        tree, is_leaf=is_structured)
