"""Calibration: run a program on sample inputs and observe the activations its weights meet.

GPTQ (and AWQ, SmoothQuant, Wanda, SparseGPT) need statistics of the activations that reach each
weight's matmul: for GPTQ the Hessian ``X^T X`` of the matmul input. :func:`collect` evaluates a
program *eagerly* on each calibration sample, with regions inlined and loops unrolled in Python,
and calls an observer at every ``dot_general`` whose operand derives from a parameter. Unrolled
scans give per-iteration statistics, so a stacked ``[L, K, N]`` weight gets one Hessian per layer
(keyed by its scan iteration indices). Eager evaluation keeps memory bounded by one sample's
activations plus the statistics themselves.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

import jax
import jax.numpy as jnp

from jaxpass.core import compat
from jaxpass.core.pass_api import PassError
from jaxpass.core.provenance import EqnSite

# observer(site, operand_values, iteration) where iteration is a tuple of scan/loop indices.
Observer = Callable[[EqnSite, list, tuple], None]


def check_samples(program, samples: Sequence[tuple]) -> None:
    """Calibration samples must match the traced example inputs (shapes and dtypes)."""
    want = jax.tree_util.tree_leaves(program.inputs.args)
    for n, sample in enumerate(samples):
        got = jax.tree_util.tree_leaves(tuple(sample))
        if len(got) != len(want):
            raise PassError(f"calibration_data[{n}] has {len(got)} arrays, the model was traced with "
                            f"{len(want)} example arguments")
        for i, (g, w) in enumerate(zip(got, want)):
            if tuple(np.shape(g)) != tuple(w.shape) or jnp.result_type(g) != jnp.dtype(w.dtype):
                raise PassError(f"calibration_data[{n}][{i}] is {jnp.result_type(g)}{list(np.shape(g))}; "
                                f"the model was traced with {jnp.dtype(w.dtype)}{list(w.shape)} (pass "
                                "example_args of the calibration shape)")


def collect(program, samples: Iterable[tuple], observe: Observer, *, progress: str | None = None) -> int:
    """Runs ``program`` on each sample (with its params and state), calling ``observe``."""
    samples = list(samples)
    check_samples(program, samples)
    sites = {s.path: s for s in program.provenance
             if s.primitive == "dot_general" and any(p is not None for p in s.in_provs)}
    params = jax.tree_util.tree_leaves(program.params)
    state = jax.tree_util.tree_leaves(program.inputs.state)
    kw = jax.tree_util.tree_leaves(program.inputs.kwargs)
    runner = _EagerRunner(sites, observe)
    iterator = samples
    if progress:
        from rich.progress import track
        iterator = track(samples, description=progress, transient=True)
    for sample in iterator:
        flat = params + state + jax.tree_util.tree_leaves(tuple(sample)) + kw
        runner.run(program.jaxpr, program.consts, flat, (), ())
    return len(samples)


class _EagerRunner:
    def __init__(self, sites, observe):
        self.sites = sites
        self.observe = observe

    def run(self, jaxpr, consts, args, path, it):
        jaxpr = compat.jaxpr_of(jaxpr)
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        read = lambda x: compat.literal_value(x) if compat.is_literal(x) else env[x]
        for i, eqn in enumerate(jaxpr.eqns):
            invals = [read(x) for x in eqn.invars]
            site = self.sites.get(path + (i,))
            if site is not None:
                self.observe(site, invals, it)
            outs = self.eqn(eqn, invals, path + (i,), it)
            for v, o in zip(eqn.outvars, outs):
                if not compat.is_dropvar(v):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn, invals, path, it):
        name = eqn.primitive.name
        regions = compat.eqn_regions(eqn)
        if not regions or name in compat.SHARD_MAP_PRIMITIVES:
            return compat.bind_eqn(eqn, invals)
        if name == "scan":
            (r,) = regions
            info = compat.scan_info(eqn)
            nc, nk = info["num_consts"], info["num_carry"]
            consts, carry, xs = invals[:nc], list(invals[nc:nc + nk]), invals[nc + nk:]
            order = range(info["length"] - 1, -1, -1) if info["reverse"] else range(info["length"])
            ys = []
            for t in order:
                outs = self.run(r.jaxpr, r.consts, [*consts, *carry, *[x[t] for x in xs]],
                                path + (r.key,), it + (t,))
                carry, y = outs[:nk], outs[nk:]
                ys.append(y)
            if info["reverse"]:
                ys = ys[::-1]
            stacked = [jnp.stack([y[j] for y in ys]) for j in range(len(eqn.outvars) - nk)]
            return [*carry, *stacked]
        if name == "while":
            cond_r, body_r = regions
            info = compat.while_info(eqn)
            cn, bn = info["cond_nconsts"], info["body_nconsts"]
            cc, bc, carry = invals[:cn], invals[cn:cn + bn], list(invals[cn + bn:])
            t = 0
            while bool(self.run(cond_r.jaxpr, cond_r.consts, [*cc, *carry], path + (cond_r.key,), it + (t,))[0]):
                carry = self.run(body_r.jaxpr, body_r.consts, [*bc, *carry], path + (body_r.key,), it + (t,))
                t += 1
            return carry
        if name == "cond":
            r = regions[int(invals[0])]
            return self.run(r.jaxpr, r.consts, invals[1:], path + (r.key,), it)
        (r,) = regions[:1]  # calls, remat, custom_jvp/vjp bodies: inline their primal program
        return self.run(r.jaxpr, r.consts, invals, path + (r.key,), it)


def collect_matmul_inputs(program, params, on_rows, *, progress: str | None = None) -> int:
    """:func:`collect` narrowed to what weight-calibration methods need: for every
    ``dot_general`` with one contracting axis whose other operand derives from a parameter in
    ``params``, calls ``on_rows(prov, x, iteration)`` with the activation as float32 rows
    ``x [n, K]`` along the contracting axis."""
    params = set(params)

    def observe(site, invals, it):
        (lc, rc), _ = site.eqn.params["dimension_numbers"]
        for op, xc in enumerate((rc, lc)):  # the weight is operand op; x contracts xc
            prov = site.in_provs[op]
            if prov is None or prov.param not in params or len(xc) != 1:
                continue
            x = jnp.moveaxis(jnp.asarray(invals[1 - op], jnp.float32), xc[0], -1)
            on_rows(prov, x.reshape(-1, x.shape[-1]), it)

    return collect(program, program.calibration_data, observe, progress=progress)


def damped_hessian(w, h, damp: float):
    """``(w, h)`` in f32, ready for an OBS-style solve (GPTQ, SparseGPT).

    Inputs that never fired (zero diagonal of ``h``) get a unit diagonal and their weight rows
    zeroed, as they cannot affect the output; then ``damp`` times the mean diagonal is added, so
    ``h`` is positive definite and its inverse's Cholesky factor exists.
    """
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    return w, h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0], dtype=jnp.float32)
