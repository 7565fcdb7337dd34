"""Random JAX programs from a small grammar, as a hypothesis strategy.

Why: hand-written zoo cases cover the shapes we thought of; generated programs cover the
combinations we did not (a transposed, bf16-cast weight inside a cond inside a scan inside a
nested jit). A test draws ``prog = data.draw(programs())`` and checks a property of
``jaxpass.transform(prog.fn, params=prog.params, example_args=(prog.x,))``.

Grammar (``h`` is the activation, always [batch, width])::

    block   := op*
    op      := matmul(W, orientation, layout)          # h @ W, W from params
             | elementwise(tanh | relu | gate | scale)  # tanh(h), max(h, 0), h * tanh(h), h * g
             | residual(block)                          # h + block(h)  (width preserved)
             | shuffle                                  # reshape / transpose of h and back
             | scan(W[L, d, d])                         # lax.scan over stacked weights
             | cond(block, block)                       # lax.cond on the sign of sum(x)
             | jit(block)                               # nested jax.jit
    orientation := "x@W" (W [d_in, d_out]) | "x@W.T" (W [d_out, d_in])
    layout      := plain | transpose (stored transposed) | reshape (stored [d_in, a, b])
                 | astype (bf16 matmul)

Guarantees: ``fn`` is deterministic; every matmul weight is an f32 Gaussian with std
1/sqrt(fan_in), every elementwise op is bounded or rescaled to keep the second moment, residuals
and scans are rescaled, and the output has >= 16 elements, so outputs are O(1) and relative error
bounds are meaningful; the cond predicate depends only on the input ``x`` (never
on a weight), so quantizing weights never changes which branch runs. ``weight_paths`` are the
``keystr`` paths of the params that feed a dot_general; ``other_paths`` are ndim >= 2 params that
do not (elementwise gains).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st
from jax import lax

from zoo import relative_error  # noqa: F401  (re-exported: tests use it with programs)

WIDTHS = (4, 8, 12)

# Relative output error that per-tensor int8 round-to-nearest of every weight must stay within
# (checked for every drawn program in test_zoo_sanity.py; measured: median ~0.008, max ~0.03
# over a few hundred draws); per-channel int8 does better. A wrong scale axis or a transposed
# weight gives errors of order 1, so 0.1 still separates right from wrong.
INT8_RTOL = 0.1


@dataclasses.dataclass
class Program:
    """A generated program: ``fn(params, x)`` plus its params, input and weight paths."""

    fn: Callable[[dict, jax.Array], jax.Array]
    params: dict
    x: jax.Array
    weight_paths: frozenset
    other_paths: frozenset
    source: str  # the program in the grammar's notation (readable hypothesis failures)

    @property
    def example_args(self) -> tuple:
        """``(x,)``: what ``jaxpass.transform(prog.fn, ..., example_args=...)`` takes."""
        return (self.x,)

    def __repr__(self):
        shapes = {k: tuple(v.shape) for k, v in self.params.items()}
        return f"Program(x={tuple(self.x.shape)}, params={shapes})\n{self.source}"


class _Builder:
    """Accumulates params while the strategy draws the program tree."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.params: dict[str, jax.Array] = {}
        self.weights: set[str] = set()
        self.others: set[str] = set()

    def param(self, shape, std, *, feeds_dot: bool) -> str:
        name = f"p{len(self.params)}"
        self.params[name] = jnp.asarray(self.rng.standard_normal(shape) * std, jnp.float32)
        if len(shape) >= 2:
            (self.weights if feeds_dot else self.others).add(f"[{name!r}]")
        return name


# A node is (source_lines, apply) where apply(params, h, x) -> h. ``x`` is the program input,
# available to cond predicates.
Node = tuple[list, Callable[[dict, jax.Array, jax.Array], jax.Array]]


def _indent(lines):
    return ["  " + s for s in lines]


@st.composite
def _matmul(draw, b: _Builder, d_in: int) -> tuple[Node, int]:
    d_out = draw(st.sampled_from(WIDTHS))
    orient = draw(st.sampled_from(["x@W", "x@W.T"]))
    layout = draw(st.sampled_from(["plain", "transpose", "reshape", "astype"]))
    std = 1.0 / math.sqrt(d_in)
    logical = (d_in, d_out) if orient == "x@W" else (d_out, d_in)   # shape used in the dot
    if layout == "transpose":
        name = b.param(logical[::-1], std, feeds_dot=True)
        get = lambda p: p[name].T
    elif layout == "reshape":
        a = 2 if logical[1] % 2 == 0 else 1
        name = b.param((logical[0], a, logical[1] // a), std, feeds_dot=True)
        get = lambda p: p[name].reshape(logical)
    else:
        name = b.param(logical, std, feeds_dot=True)
        get = lambda p: p[name]
    with_bias = draw(st.booleans())
    bias = b.param((d_out,), 0.1, feeds_dot=False) if with_bias else None

    def apply(p, h, x):
        w = get(p)
        if layout == "astype":
            y = (h.astype(jnp.bfloat16) @ (w if orient == "x@W" else w.T).astype(jnp.bfloat16))
            y = y.astype(jnp.float32)
        else:
            y = h @ w if orient == "x@W" else h @ w.T
        return y + p[bias] if bias is not None else y

    src = f"h = h {'@' if orient == 'x@W' else '@ T'} {name}[{layout}] " \
          f"({d_in}->{d_out}){' + ' + bias if bias else ''}"
    return ([src], apply), d_out


@st.composite
def _elementwise(draw, b: _Builder, d: int) -> tuple[Node, int]:
    kind = draw(st.sampled_from(["tanh", "relu", "gate", "scale"]))
    if kind == "tanh":
        return (["h = tanh(h)"], lambda p, h, x: jnp.tanh(h)), d
    if kind == "relu":  # x sqrt(2): keeps the second moment of a centred input
        return (["h = relu(h) * sqrt2"], lambda p, h, x: jnp.maximum(h, 0.0) * math.sqrt(2)), d
    if kind == "gate":
        return (["h = h * tanh(h)"], lambda p, h, x: h * jnp.tanh(h)), d
    # A [1, d] elementwise gain: 2-D but not a matmul weight (must not be quantized as one).
    name = b.param((1, d), 0.1, feeds_dot=False)
    return ([f"h = h * (1 + {name})"], lambda p, h, x: h * (1.0 + p[name])), d


@st.composite
def _shuffle(draw, b: _Builder, d: int) -> tuple[Node, int]:
    a = draw(st.sampled_from([k for k in (2, 3, 4) if d % k == 0]))

    def apply(p, h, x):
        n = h.shape[0]
        return jnp.transpose(h.reshape(n, a, d // a), (0, 2, 1)).reshape(n, d)

    return ([f"h = reshape(transpose(reshape(h, [n, {a}, {d // a}])), [n, {d}])"], apply), d


@st.composite
def _scan(draw, b: _Builder, d: int) -> tuple[Node, int]:
    L = draw(st.integers(1, 3))
    name = b.param((L, d, d), 1.0 / math.sqrt(d), feeds_dot=True)
    transposed = draw(st.booleans())

    def apply(p, h, x):
        def body(h, w):
            return h + jnp.tanh(h @ (w.T if transposed else w)), None
        return lax.scan(body, h, p[name])[0] / math.sqrt(1 + L)

    src = f"h = scan(h + tanh(h @ {'T ' if transposed else ''}{name}[l]), l < {L}) / sqrt({1 + L})"
    return ([src], apply), d


@st.composite
def _block(draw, b: _Builder, d: int, depth: int, *, keep_width: bool = False,
           max_ops: int = 4) -> tuple[Node, int]:
    """A sequence of ops; with ``keep_width`` the block ends at its input width."""
    n_ops = draw(st.integers(1, max_ops))
    nodes: list[Node] = []
    d0 = d
    for _ in range(n_ops):
        choices = ["matmul", "elementwise", "shuffle", "scan"]
        if depth > 0:
            choices += ["residual", "cond", "jit"]
        op = draw(st.sampled_from(choices))
        if op == "matmul":
            node, d = draw(_matmul(b, d))
        elif op == "elementwise":
            node, d = draw(_elementwise(b, d))
        elif op == "shuffle":
            node, d = draw(_shuffle(b, d))
        elif op == "scan":
            node, d = draw(_scan(b, d))
        elif op == "residual":
            (src, inner), _ = draw(_block(b, d, depth - 1, keep_width=True, max_ops=3))
            node = (["h = (h + residual(h)) / sqrt2, residual:"] + _indent(src),
                    lambda p, h, x, inner=inner: (h + inner(p, h, x)) / math.sqrt(2))
        elif op == "cond":
            (s1, f1), _ = draw(_block(b, d, depth - 1, keep_width=True, max_ops=2))
            (s2, f2), _ = draw(_block(b, d, depth - 1, keep_width=True, max_ops=2))

            def apply(p, h, x, f1=f1, f2=f2):
                return lax.cond(jnp.sum(x) > 0,
                                lambda h: f1(p, h, x), lambda h: f2(p, h, x), h)
            node = (["h = cond(sum(x) > 0, then:"] + _indent(s1) + ["else:"] + _indent(s2),
                    apply)
        else:  # jit
            (src, inner), d = draw(_block(b, d, depth - 1, max_ops=3))

            def apply(p, h, x, inner=inner):
                return jax.jit(lambda p, h, x: inner(p, h, x))(p, h, x)
            node = (["h = jit:"] + _indent(src), apply)
        nodes.append(node)
    if keep_width and d != d0:
        node, d = _matmul_to(b, d, d0)
        nodes.append(node)

    def run(p, h, x, fs=tuple(f for _, f in nodes)):
        for f in fs:
            h = f(p, h, x)
        return h

    return ([line for src, _ in nodes for line in src], run), d


def _matmul_to(b: _Builder, d_in: int, d_out: int) -> tuple[Node, int]:
    """A plain x @ W projecting back to ``d_out`` (closes a width-preserving block)."""
    name = b.param((d_in, d_out), 1.0 / math.sqrt(d_in), feeds_dot=True)
    return ([f"h = h @ {name} ({d_in}->{d_out})"], lambda p, h, x: h @ p[name]), d_out


@st.composite
def programs(draw, max_depth: int = 2, max_ops: int = 3) -> Program:
    """Hypothesis strategy of :class:`Program` (see the module docstring for the grammar).

    Every program ends in a matmul, so it has at least one weight. ``max_depth`` bounds the
    nesting of residual / cond / jit; ``max_ops`` the length of each block.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    b = _Builder(seed)
    batch = draw(st.integers(2, 4))
    d = draw(st.sampled_from(WIDTHS))
    (src, body), d_last = draw(_block(b, d, max_depth, max_ops=max_ops))
    # >= 16 output elements: a relative error over a handful of numbers is dominated by the
    # chance that they nearly cancel, not by the quantization being tested.
    (src_out, out), _ = _matmul_to(b, d_last, draw(st.sampled_from((8, 12))))
    x = jnp.asarray(b.rng.standard_normal((batch, d)), jnp.float32)

    def fn(params, x):
        return out(params, body(params, x, x), x)

    return Program(fn=fn, params=b.params, x=x, weight_paths=frozenset(b.weights),
                   other_paths=frozenset(b.others),
                   source="\n".join([f"x: f32[{batch}, {d}]", "h = x"] + src + src_out))
