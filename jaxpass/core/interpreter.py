"""The rewriting interpreter: re-traces a jaxpr, applying one pass's rules.

This is ``jax.core.eval_jaxpr`` with three additions:

1. *Rules*: a pass maps primitive names to handlers ``handler(ctx, eqn, invals)`` that return the
   equation's outputs (usually by calling a named op) or ``NotImplemented`` to keep it as is.
2. *Structured values* (:mod:`jaxpass.core.values`) travel through layout-only equations and
   region boundaries; an equation that cannot take one receives the dense value, and the
   fallback is recorded.
3. *Regions* (scan, while, cond, jit, remat) are rebuilt through JAX's public APIs
   (``lax.scan``, ``lax.while_loop``, ``lax.switch``, ``jax.jit``, ``jax.checkpoint``) with the
   interpreter as their body whenever a structured value enters them or a rule may fire inside;
   otherwise they are re-bound exactly as traced. Custom-derivative regions (custom_jvp/vjp)
   and shard_map are always re-bound as traced, so their derivative rules and specs are kept;
   structured values are materialized at their boundary.

Running the interpreter under ``jax.make_jaxpr`` yields the rewritten program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
from jax import lax

from jaxpass.core import compat
from jaxpass.core.values import LAYOUT_PRIMITIVES, is_structured, materialize

Handler = Callable[["RuleContext", Any, list], Any]


@dataclasses.dataclass
class Rules:
    """A pass's rewrite rules.

    ``handlers`` maps primitive names to handlers. Handlers named in ``structured_only`` are
    consulted only when a structured value is among the operands (so regions without one are not
    rebuilt on their account).
    """

    handlers: Mapping[str, Handler] = dataclasses.field(default_factory=dict)
    structured_only: frozenset = frozenset()

    @property
    def eager_primitives(self) -> frozenset:
        return frozenset(self.handlers) - self.structured_only


@dataclasses.dataclass(frozen=True)
class Event:
    """Something the interpreter did that a report should show."""

    kind: str      # "rewrite" | "materialize" | "boundary"
    op: str        # primitive name and where it is
    param: str     # source parameter path of the structured value involved ('' if none)
    detail: str = ""


class EventLog:
    def __init__(self):
        self.events: list[Event] = []
        self._seen = set()

    def add(self, event: Event) -> None:
        key = (event.kind, event.op, event.param, event.detail)
        if key not in self._seen:
            self._seen.add(key)
            self.events.append(event)


@dataclasses.dataclass
class RuleContext:
    """What a handler may use: where the equation is, and the event log."""

    path: tuple
    regions: tuple
    log: EventLog

    def location(self, eqn) -> str:
        where = compat.source_location(eqn)
        inside = "/".join(self.regions)
        return eqn.primitive.name + (f" in {inside}" if inside else "") + (f" at {where}" if where else "")

    def record(self, kind: str, eqn, param: str = "", detail: str = "") -> None:
        self.log.add(Event(kind, self.location(eqn), param, detail))


class Interpreter:
    """Evaluates (and, under tracing, rewrites) a jaxpr with a pass's rules."""

    def __init__(self, rules: Rules | None = None, log: EventLog | None = None):
        self.rules = rules or Rules()
        self.log = log if log is not None else EventLog()
        self._touch_cache: dict[int, bool] = {}

    # -- entry point ---------------------------------------------------------------------------
    def run(self, jaxpr, consts, args, path=(), regions=()):
        jaxpr = compat.jaxpr_of(jaxpr)
        env: dict = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        if len(args) != len(jaxpr.invars):
            raise ValueError(f"program expects {len(jaxpr.invars)} inputs, got {len(args)}")
        for v, a in zip(jaxpr.invars, args):
            env[v] = a

        def read(x):
            return compat.literal_value(x) if compat.is_literal(x) else env[x]

        for i, eqn in enumerate(jaxpr.eqns):
            invals = [read(x) for x in eqn.invars]
            ctx = RuleContext(path + (i,), regions, self.log)
            outs = self.eval_eqn(ctx, eqn, invals)
            for v, o in zip(eqn.outvars, outs):
                if not compat.is_dropvar(v):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    # -- one equation ----------------------------------------------------------------------------
    def eval_eqn(self, ctx: RuleContext, eqn, invals):
        # Whatever replaces an equation keeps its source location and name stack.
        with compat.eqn_context(eqn):
            return self._eval_eqn(ctx, eqn, invals)

    def _eval_eqn(self, ctx: RuleContext, eqn, invals):
        name = eqn.primitive.name
        structured = [v for v in invals if is_structured(v)]
        handler = self.rules.handlers.get(name)
        if handler is not None and (structured or name not in self.rules.structured_only):
            out = handler(ctx, eqn, invals)
            if out is not NotImplemented:
                return list(out) if isinstance(out, (list, tuple)) else [out]
        regions = compat.eqn_regions(eqn)
        if regions:
            return self._eval_region(ctx, eqn, invals, regions, bool(structured))
        if structured and name in LAYOUT_PRIMITIVES and is_structured(invals[0]) and len(structured) == 1:
            out = invals[0].apply_layout(name, eqn.params, *invals[1:])
            if out is not None:
                return [out]
        if structured:
            invals = [self._materialize(ctx, eqn, v) for v in invals]
        return compat.bind_eqn(eqn, invals)

    def _materialize(self, ctx, eqn, value, why: str = ""):
        if not is_structured(value):
            return value
        detail = why or f"{value.format_name} value made dense for {eqn.primitive.name}"
        ctx.record("materialize", eqn, value.source, detail)
        return value.materialize()

    # -- regions ---------------------------------------------------------------------------------
    def _touches(self, jaxpr) -> bool:
        """Whether a rule may fire somewhere inside ``jaxpr`` without structured inputs."""
        eager = self.rules.eager_primitives
        if not eager:
            return False
        key = id(jaxpr)
        if key not in self._touch_cache:
            found = False
            for eqn in compat.jaxpr_of(jaxpr).eqns:
                if eqn.primitive.name in eager or any(self._touches(r.jaxpr) for r in compat.eqn_regions(eqn)):
                    found = True
                    break
            self._touch_cache[key] = found
        return self._touch_cache[key]

    def _eval_region(self, ctx, eqn, invals, regions, has_structured):
        name = eqn.primitive.name
        rebuild = has_structured or any(self._touches(r.jaxpr) for r in regions)
        if not rebuild:
            return compat.bind_eqn(eqn, invals)
        sub_regions = ctx.regions + (name,)
        if name == "scan":
            return self._scan(ctx, eqn, invals, regions[0], sub_regions)
        if name == "while":
            return self._while(ctx, eqn, invals, regions, sub_regions)
        if name == "cond":
            return self._cond(ctx, eqn, invals, regions, sub_regions)
        if name in compat.CALL_PRIMITIVES:
            return self._call(ctx, eqn, invals, regions[0], sub_regions)
        if name in compat.REMAT_PRIMITIVES:
            return self._remat(ctx, eqn, invals, regions[0], sub_regions)
        # custom_jvp / custom_vjp / shard_map / unknown: keep as traced, inputs made dense.
        if has_structured:
            for v in invals:
                if is_structured(v):
                    ctx.record("boundary", eqn, v.source,
                               f"{v.format_name} value made dense at the {name} boundary "
                               "(the region is kept as traced so its rules stay valid)")
            invals = [materialize(v) for v in invals]
        return compat.bind_eqn(eqn, invals)

    def _sub(self, region, key_path, regions):
        def run(*args):
            return self.run(region.jaxpr, region.consts, list(args), key_path, regions)
        return run

    def _dense_outputs(self, ctx, eqn, outs):
        return [self._materialize(ctx, eqn, o, "structured region output made dense") for o in outs]

    def _scan(self, ctx, eqn, invals, region, regions):
        info = compat.scan_info(eqn)
        nc, nk = info["num_consts"], info["num_carry"]
        consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        init = [self._materialize(ctx, eqn, v, "scan carry made dense") for v in init]
        body_run = self._sub(region, ctx.path + (region.key,), regions)

        def body(carry, x):
            outs = self._dense_outputs(ctx, eqn, body_run(*consts, *carry, *x))
            return outs[:nk], outs[nk:]

        kwargs = dict(length=info["length"], reverse=info["reverse"], unroll=info["unroll"])
        if info["split_transpose"]:
            kwargs["_split_transpose"] = True
        carry, ys = lax.scan(body, init, xs, **kwargs)
        return [*carry, *ys]

    def _while(self, ctx, eqn, invals, regions_, regions):
        info = compat.while_info(eqn)
        cn, bn = info["cond_nconsts"], info["body_nconsts"]
        cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
        init = [self._materialize(ctx, eqn, v, "while carry made dense") for v in init]
        cond_r, body_r = regions_
        cond_run = self._sub(cond_r, ctx.path + (cond_r.key,), regions)
        body_run = self._sub(body_r, ctx.path + (body_r.key,), regions)

        def cond_fun(carry):
            return cond_run(*cconsts, *carry)[0]

        def body_fun(carry):
            return self._dense_outputs(ctx, eqn, body_run(*bconsts, *carry))

        return list(lax.while_loop(cond_fun, body_fun, list(init)))

    def _cond(self, ctx, eqn, invals, regions_, regions):
        index, ops = invals[0], invals[1:]

        def branch(region):
            run = self._sub(region, ctx.path + (region.key,), regions)
            return lambda *a: self._dense_outputs(ctx, eqn, run(*a))

        return list(lax.switch(index, [branch(r) for r in regions_], *ops))

    def _call(self, ctx, eqn, invals, region, regions):
        run = self._sub(region, ctx.path + (region.key,), regions)

        def body(*args):
            return run(*args)

        body.__name__ = body.__qualname__ = compat.call_name(eqn)
        if eqn.primitive.name in ("jit", "pjit"):
            if compat.jit_has_explicit_shardings(eqn):
                ctx.record("boundary", eqn, "", "explicit in/out shardings of this nested jit were "
                           "dropped when it was rebuilt (XLA propagates shardings instead)")
            return list(jax.jit(body, inline=compat.jit_inline(eqn))(*invals))
        return list(body(*invals))

    def _remat(self, ctx, eqn, invals, region, regions):
        info = compat.remat_info(eqn)
        run = self._sub(region, ctx.path + (region.key,), regions)
        return list(jax.checkpoint(run, prevent_cse=info["prevent_cse"], policy=info["policy"])(*invals))
