"""The one module that touches JAX internals.

Everything else in jaxpass reads jaxprs through the small vocabulary defined here, so a change of
JAX's internals is absorbed in this file. Known differences it handles: jax 0.11 merged
``ClosedJaxpr`` into ``Jaxpr`` (every jaxpr carries ``.consts``), replaced scan's
``num_consts``/``num_carry`` by ``ft_in``/``ft_out``, made jit's ``inline`` an enum and turned
``closed_call`` into ``eval_jaxpr``; jax 0.10 made ``get_bind_params`` return params alone.
Both versions name the jit primitive ``jit`` (``pjit`` before 0.7) and remat ``remat2``.

What it provides:
- reading: :func:`jaxpr_of` / :func:`consts_of`, :func:`eqn_regions` (the sub-jaxprs of a
  higher-order equation with how its operands map onto each region's inputs),
- evaluating: :func:`eval_jaxpr`, :func:`bind_eqn` (re-binds an equation as it was traced),
- primitives: :func:`make_primitive` for jaxpass's named ops,
- checking: :func:`check_jaxpr`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir


try:  # jax >= 0.4.36
    from jax._src import core as _core
except ImportError:  # pragma: no cover
    _core = None

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())

Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
Var = jex_core.Var
Literal = jex_core.Literal
JaxprEqn = jex_core.JaxprEqn
Primitive = jex_core.Primitive


# --------------------------------------------------------------------------------------------
# Reading jaxprs
# --------------------------------------------------------------------------------------------

def jaxpr_of(j) -> Jaxpr:
    """The jaxpr to walk: ``ClosedJaxpr.jaxpr`` on 0.10; on 0.11 ``ClosedJaxpr`` is ``Jaxpr``
    and ``.jaxpr`` returns the object itself; an open 0.10 ``Jaxpr`` has no ``.jaxpr``."""
    return getattr(j, "jaxpr", j)


def consts_of(j) -> list:
    """Values of the jaxpr's constvars (0.10: ``ClosedJaxpr.consts``; 0.11: every ``Jaxpr`` has
    ``.consts``, possibly empty; an open 0.10 ``Jaxpr`` has none)."""
    return list(getattr(j, "consts", ()) or ())


def is_tracer(x) -> bool:
    """Whether ``x`` is an abstract value under a trace (jit, grad, vmap, make_jaxpr)."""
    return isinstance(x, jax.core.Tracer)


def is_literal(x) -> bool:
    return isinstance(x, Literal)


def literal_value(x):
    return x.val


def aval_of(x):
    """The abstract value of a Var, Literal, array or ShapeDtypeStruct."""
    if isinstance(x, (Var, Literal)):
        return x.aval
    if isinstance(x, jax.ShapeDtypeStruct):
        return _core.ShapedArray(x.shape, x.dtype)
    return jax.typeof(x)


def shaped(shape, dtype):
    return _core.ShapedArray(tuple(shape), jnp.dtype(dtype))


def is_dropvar(v) -> bool:
    return type(v).__name__ == "DropVar"


def source_location(eqn) -> str:
    """A short 'file:line (function)' for an equation, or '' if unknown."""
    try:
        from jax._src import source_info_util as siu
        frame = siu.user_frame(eqn.source_info.traceback)
        if frame is None:
            return ""
        return f"{frame.file_name.rsplit('/', 1)[-1]}:{frame.start_line} ({frame.function_name})"
    except Exception:  # pragma: no cover - best effort only
        return ""


# Primitive names, by role. Both spellings are listed where JAX renamed them.
CALL_PRIMITIVES = frozenset({"jit", "pjit", "closed_call", "core_call", "eval_jaxpr"})
REMAT_PRIMITIVES = frozenset({"remat2", "checkpoint", "remat"})
CUSTOM_DERIVATIVE_PRIMITIVES = frozenset(
    {"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})
SHARD_MAP_PRIMITIVES = frozenset({"shard_map"})
OPAQUE_KERNEL_PRIMITIVES = frozenset({"pallas_call", "custom_call", "ffi_call", "triton_kernel_call"})


@dataclasses.dataclass(frozen=True)
class Region:
    """A sub-jaxpr of a higher-order equation and how the equation's operands feed it.

    ``operand_index[i]`` is the index into ``eqn.invars`` that feeds region input ``i``, or None
    when the region input is loop-carried state that is not simply an operand (a scan carry after
    the first iteration still starts as an operand, so carries do map). ``sliced[i]`` is True when
    the region sees one slice of the operand along its leading axis (scan ``xs``).
    ``outvar_index[j]`` is the index into ``eqn.outvars`` that region output ``j`` becomes, or None.
    """

    key: str
    jaxpr: Jaxpr
    consts: tuple
    operand_index: tuple
    sliced: tuple
    outvar_index: tuple
    #: (region input position, region output position) of loop-carried values: a value is the
    #: same on every iteration only if the body returns its input unchanged.
    carry_pairs: tuple = ()


def eqn_regions(eqn) -> list[Region]:
    """The regions of a higher-order equation; [] for a first-order one."""
    name = eqn.primitive.name
    p = eqn.params
    n_in = len(eqn.invars)
    n_out = len(eqn.outvars)

    def closed(j):
        return jaxpr_of(j), tuple(consts_of(j))

    if name == "scan":
        j, c = closed(p["jaxpr"])
        nc, nk, nx, _ = scan_groups(eqn)
        sliced = (False,) * (nc + nk) + (True,) * nx
        # Region outputs: carries (map to eqn carry outs), then ys (stacked; no plain map).
        out_idx = tuple(range(nk)) + (None,) * (n_out - nk)
        pairs = tuple((nc + k, k) for k in range(nk))
        return [Region("jaxpr", j, c, tuple(range(n_in)), sliced, out_idx, pairs)]
    if name == "while":
        cj, cc = closed(p["cond_jaxpr"])
        bj, bc = closed(p["body_jaxpr"])
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        carry = tuple(range(cn + bn, n_in))
        return [
            Region("cond_jaxpr", cj, cc, tuple(range(cn)) + carry, (False,) * (cn + len(carry)),
                   (None,)),
            Region("body_jaxpr", bj, bc, tuple(range(cn, cn + bn)) + carry,
                   (False,) * (bn + len(carry)), tuple(range(len(carry))),
                   tuple((bn + k, k) for k in range(len(carry)))),
        ]
    if name == "cond":
        out = []
        for i, br in enumerate(p["branches"]):
            j, c = closed(br)
            out.append(Region(f"branches[{i}]", j, c, tuple(range(1, n_in)),
                              (False,) * (n_in - 1), tuple(range(n_out))))
        return out
    if name in CALL_PRIMITIVES or name in REMAT_PRIMITIVES or name in SHARD_MAP_PRIMITIVES:
        key = "jaxpr" if "jaxpr" in p else "call_jaxpr"
        j, c = closed(p[key])
        return [Region(key, j, c, tuple(range(n_in)), (False,) * n_in, tuple(range(n_out)))]
    if name == "custom_jvp_call":
        j, c = closed(p["call_jaxpr"])
        return [Region("call_jaxpr", j, c, tuple(range(n_in)), (False,) * n_in,
                       tuple(range(n_out)))]
    if name in ("custom_vjp_call", "custom_vjp_call_jaxpr"):
        key = "call_jaxpr" if "call_jaxpr" in p else "fun_jaxpr"
        j, c = closed(p[key])
        return [Region(key, j, c, tuple(range(n_in)), (False,) * n_in, tuple(range(n_out)))]
    # Unknown higher-order primitives are opaque: report them, never descend.
    return []


def has_subjaxprs(eqn) -> bool:
    return any(True for _ in jex_core.jaxprs_in_params(eqn.params))


def scan_groups(eqn) -> tuple[int, int, int, int]:
    """(consts, carries, xs, ys) counts of a scan: 0.10 has ``num_consts``/``num_carry``;
    0.11 replaced them by the flat trees ``ft_in``/``ft_out``."""
    p = eqn.params
    n_in, n_out = len(eqn.invars), len(eqn.outvars)
    if "ft_in" in p:
        nc, nk, nx = (len(g) for g in p["ft_in"].unpack())
    else:
        nc, nk = p["num_consts"], p["num_carry"]
        nx = n_in - nc - nk
    return nc, nk, nx, n_out - nk


def scan_info(eqn) -> dict:
    p = eqn.params
    nc, nk, _, _ = scan_groups(eqn)
    return dict(num_consts=nc, num_carry=nk, length=p["length"], reverse=p["reverse"],
                unroll=p["unroll"], split_transpose=p.get("_split_transpose", False))


def jit_has_explicit_shardings(eqn) -> bool:
    """Whether a jit equation was given in/out shardings (not the unspecified default)."""
    shardings = tuple(eqn.params.get("in_shardings", ())) + tuple(eqn.params.get("out_shardings", ()))
    return any(type(s).__name__ != "UnspecifiedValue" for s in shardings)


def jit_inline(eqn):
    """The ``inline`` argument that re-creates a jit equation (a bool on 0.10, an enum on 0.11)."""
    return eqn.params.get("inline", False)


def while_info(eqn) -> dict:
    p = eqn.params
    return dict(cond_nconsts=p["cond_nconsts"], body_nconsts=p["body_nconsts"])


def call_name(eqn) -> str:
    return str(eqn.params.get("name", eqn.primitive.name))


def remat_info(eqn) -> dict:
    p = eqn.params
    return dict(prevent_cse=p.get("prevent_cse", True), policy=p.get("policy"))


# --------------------------------------------------------------------------------------------
# Tracing and evaluation
# --------------------------------------------------------------------------------------------


def eval_jaxpr(jaxpr, consts, *args):
    """Evaluates an open jaxpr with its consts (binds every equation as traced)."""
    return _core.eval_jaxpr(jaxpr_of(jaxpr), consts, *args)


def eval_closed(closed, *args):
    return eval_jaxpr(jaxpr_of(closed), consts_of(closed), *args)


def bind_params(eqn) -> tuple[list, dict]:
    """(subfuns, params) to re-bind an equation: jax < 0.10 returned both from
    ``get_bind_params``, jax >= 0.10 returns the params alone."""
    got = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[0], list):
        return got
    return [], got


def eqn_context(eqn):
    """Context that makes re-bound equations keep their source location and name stack."""
    import contextlib
    from jax._src import source_info_util as siu
    stack = contextlib.ExitStack()
    try:
        name_stack = siu.current_name_stack() + eqn.source_info.name_stack
        stack.enter_context(siu.user_context(eqn.source_info.traceback, name_stack=name_stack))
    except Exception:  # pragma: no cover - source info is best effort
        pass
    ctx = getattr(eqn, "ctx", None)
    if ctx is not None and hasattr(ctx, "manager"):
        stack.enter_context(ctx.manager)
    return stack


def bind_eqn(eqn, invals):
    """Re-binds an equation exactly as traced (what ``eval_jaxpr`` does for it)."""
    subfuns, params = bind_params(eqn)
    with eqn_context(eqn):
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def check_jaxpr(closed) -> None:
    """Type-checks a jaxpr (raises ``JaxprTypeError`` on an ill-typed program)."""
    jex_core.check_jaxpr(jaxpr_of(closed))



# --------------------------------------------------------------------------------------------
# Named-op primitives
# --------------------------------------------------------------------------------------------

def _unmapped(dim) -> bool:
    """Batching rules see None (jax >= 0.10) or a ``not_mapped`` sentinel (older) for unbatched."""
    return dim is None or type(dim).__name__ == "NotMapped"


def make_primitive(name: str, impl: Callable, *, multiple_results: bool = False) -> Primitive:
    """A primitive whose every rule derives from ``impl(*arrays, **params)``.

    - evaluation and lowering inline ``impl`` (so XLA sees ordinary ops),
    - abstract evaluation is ``jax.eval_shape`` of ``impl``,
    - JVP is ``jax.jvp`` of ``impl`` (its linear part is ordinary primitives, so transposition
      and reverse-mode work without a transpose rule),
    - batching is ``jax.vmap`` of ``impl`` with the batch axes moved to the front.
    """
    prim = Primitive(name)
    prim.multiple_results = multiple_results

    def impl_rule(*args, **params):
        out = impl(*args, **params)
        return list(out) if multiple_results else out

    compiled: dict = {}

    def eager_rule(*args, **params):
        # Eager calls (outside any trace) run the impl compiled, once per static params.
        key = tuple(sorted(params.items()))
        fn = compiled.get(key)
        if fn is None:
            fn = compiled[key] = jax.jit(functools.partial(impl_rule, **params))
        return fn(*args)

    shape_cache: dict = {}

    def abstract_eval(*avals, **params):
        # Cached: a 32-layer model binds the same op at the same shapes hundreds of times.
        key = (tuple((a.shape, a.dtype) for a in avals), tuple(sorted(params.items())))
        out = shape_cache.get(key)
        if out is None:
            structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
            out = jax.eval_shape(functools.partial(impl, **params), *structs)
            shape_cache[key] = out
        if multiple_results:
            return [shaped(o.shape, o.dtype) for o in out]
        return shaped(out.shape, out.dtype)

    def jvp_rule(primals, tangents, **params):
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        out, tan = jax.jvp(functools.partial(impl, **params), tuple(primals), tuple(tangents))
        if multiple_results:
            return list(out), list(tan)
        return out, tan

    def batch_rule(args, dims, **params):
        moved = [a if _unmapped(d) else jnp.moveaxis(a, d, 0)
                 for a, d in zip(args, dims)]
        in_axes = tuple(None if _unmapped(d) else 0 for d in dims)
        out = jax.vmap(functools.partial(impl, **params), in_axes=in_axes)(*moved)
        if multiple_results:
            return list(out), [0] * len(out)
        return out, 0

    prim.def_impl(eager_rule)
    prim.def_abstract_eval(abstract_eval)
    ad.primitive_jvps[prim] = jvp_rule
    batching.primitive_batchers[prim] = batch_rule
    mlir.register_lowering(prim, mlir.lower_fun(impl_rule, multiple_results=multiple_results))
    return prim
