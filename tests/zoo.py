"""A zoo of small JAX programs and models for testing ``jaxpass.transform``.

Why this exists: the core promises to follow parameters through everything real models do
(nested jit, scan over stacked layers, remat, cond, while, custom_jvp / custom_vjp, layout ops,
tied weights, NNX / Linen / Equinox / transformers modules). Each case here is a tiny, seeded,
float32 instance of one of those shapes, so tests can check that

  (a) ``passes=[]`` is the identity, bit for bit, for outputs and gradients, and
  (b) int8 weight quantization of the matmul weights stays within ``ZooModel.int8_rtol``.

Usage (``tests/conftest.py`` puts this directory on ``sys.path``)::

    import zoo
    for case in zoo.CASES:
        zm = case.build()          # a fresh ZooModel (see "Builds" below)
        out = zm.run()             # the original program on its example arguments

Builds: every ``build()`` returns a new ZooModel with new pytree containers and, for NNX, a new
module (NNX modules are mutable). The immutable parts (functions, arrays, Equinox modules) are
built once and shared, so jitted wrappers of ``model`` hit JAX's compilation cache across builds.

The ``ZooModel`` contract (what the core's tests may rely on):

- ``kind``: "fn" | "linen" | "nnx" | "eqx".
- ``model``: for "fn", a function ``fn(params, *args)``; for "linen", ``module.apply`` (so
  ``params`` is the whole variables dict, ``{"params": ...}``); for "nnx" / "eqx", the module.
- ``params``: the params pytree for "fn" / "linen"; None for "nnx" / "eqx".
- ``example_args``: a tuple of arrays.
- ``loss(out) -> scalar``: what to differentiate.
- ``weight_paths``: ``jax.tree_util.keystr`` paths of the leaves of :meth:`ZooModel.param_tree`
  that are ndim >= 2 matmul weights, i.e. feed a dot_general (possibly through layout ops, scan
  slicing, nested calls or custom-derivative functions).
- ``other_paths``: the remaining ndim >= 2 leaves (gather-only embeddings, conv kernels, biases
  and norm scales stacked [L, n] for a scan); every ndim >= 2 leaf is in exactly one of the two
  sets (the sanity tests check this).
- ``int8_rtol``: a generous bound on ``relative_error(out_q, out)`` when every weight in
  ``weight_paths`` is replaced by its symmetric int8 round-to-nearest quantization (the sanity
  tests check the bound with one *per-tensor* scale, which is never better than per-channel or
  per-group scales, so a correct per-channel Quantize pass is expected to meet it easily).
- ``reverse_differentiable``: False for a program with a ``while`` primitive (reverse-mode
  autodiff of ``lax.while_loop`` is impossible in JAX); :meth:`ZooModel.grads` then uses
  forward mode.
- ``primitives``: the higher-order primitives the case is meant to exercise, in canonical names
  (see :func:`higher_order_primitives`); the sanity tests check that the traced jaxpr has them.

Helpers (side-effect free: NNX modules are cloned before they run): :meth:`ZooModel.run`,
:meth:`ZooModel.run_jit`, :meth:`ZooModel.param_tree`, :meth:`ZooModel.leaves`,
:meth:`ZooModel.replace_leaves`, :meth:`ZooModel.grads`, :meth:`ZooModel.make_jaxpr`,
:meth:`ZooModel.dot_fed_paths`; module functions :func:`get`, :func:`names`,
:func:`relative_error`, :func:`fake_quant_int8`, :func:`higher_order_primitives`,
:func:`dot_fed_paths`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("fn", "nnx", "eqx", "linen")


# ---------------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ZooModel:
    """One built zoo program; see the module docstring for the contract."""

    kind: str
    model: Any
    params: Any
    example_args: tuple
    loss: Callable[[Any], jax.Array]
    weight_paths: frozenset
    other_paths: frozenset = frozenset()
    int8_rtol: float = 0.05
    reverse_differentiable: bool = True
    primitives: frozenset = frozenset()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.weight_paths = frozenset(self.weight_paths)
        self.other_paths = frozenset(self.other_paths)
        self.primitives = frozenset(self.primitives)

    # -- params ------------------------------------------------------------------------------

    def param_tree(self):
        """The pytree that ``weight_paths`` are keystr paths into (see the module docstring)."""
        if self.kind in ("fn", "linen"):
            return self.params
        if self.kind == "nnx":
            from flax import nnx
            return nnx.to_pure_dict(nnx.state(self.model, nnx.Param))
        import equinox as eqx
        return eqx.filter(self.model, eqx.is_array)

    def leaves(self) -> dict[str, jax.Array]:
        """``{keystr(path): leaf}`` over :meth:`param_tree`."""
        flat, _ = jax.tree_util.tree_flatten_with_path(self.param_tree())
        return {jax.tree_util.keystr(p): x for p, x in flat}

    def replace_leaves(self, new: Mapping[str, jax.Array]) -> "ZooModel":
        """A copy of this ZooModel with the leaves at the given paths replaced."""
        unknown = set(new) - set(self.leaves())
        if unknown:
            raise KeyError(f"not leaves of the param tree: {sorted(unknown)}")

        def swap(path, x):
            return new.get(jax.tree_util.keystr(path), x)

        if self.kind in ("fn", "linen"):
            return dataclasses.replace(
                self, params=jax.tree_util.tree_map_with_path(swap, self.params))
        if self.kind == "nnx":
            from flax import nnx
            module = nnx.clone(self.model)
            state = nnx.state(module, nnx.Param)
            pure = jax.tree_util.tree_map_with_path(swap, nnx.to_pure_dict(state))
            nnx.replace_by_pure_dict(state, pure)
            nnx.update(module, state)
            return dataclasses.replace(self, model=module)
        # Equinox: array leaves have the same paths in the filtered and the full module.
        return dataclasses.replace(
            self, model=jax.tree_util.tree_map_with_path(swap, self.model))

    # -- running -----------------------------------------------------------------------------

    def run(self, *args):
        """The original program, eagerly, on ``args`` (default: ``example_args``)."""
        args = args or self.example_args
        if self.kind in ("fn", "linen"):
            return self.model(self.params, *args)
        if self.kind == "nnx":
            from flax import nnx
            return nnx.clone(self.model)(*args)
        return self.model(*args)

    def run_jit(self, *args):
        """The original program under jit (``nnx.jit`` / ``eqx.filter_jit`` for modules).

        The jitted wrappers are cached, so running a copy made by :meth:`replace_leaves` (same
        shapes, other values) reuses the compiled executable.
        """
        args = args or self.example_args
        if self.kind in ("fn", "linen"):
            return _jitted(self.model)(self.params, *args)
        if self.kind == "nnx":
            from flax import nnx
            return _jitted("nnx")(nnx.clone(self.model), *args)
        return _jitted("eqx")(self.model, *args)

    def grads(self, *args, jit: bool = True) -> dict[str, jax.Array]:
        """``{keystr(path): d loss / d leaf}`` over :meth:`param_tree` (float leaves only).

        Reverse mode (``jax.grad`` / ``nnx.grad`` / ``eqx.filter_grad``) unless the program is not
        reverse differentiable, then forward mode (``jax.jacfwd``) on the same param tree.
        """
        args = args or self.example_args
        loss = self.loss
        if self.kind in ("fn", "linen"):
            f = lambda p: loss(self.model(p, *args))
            g = (jax.grad(f) if self.reverse_differentiable else jax.jacfwd(f))
            g = jax.jit(g) if jit else g
            tree = g(self.params)
        elif self.kind == "nnx":
            from flax import nnx
            module = nnx.clone(self.model)
            if self.reverse_differentiable:
                g = nnx.grad(lambda m: loss(m(*args)))
                g = nnx.jit(g) if jit else g
                tree = nnx.to_pure_dict(g(module))
            else:
                raise NotImplementedError("forward-mode grads of an NNX case")
        else:
            import equinox as eqx
            if self.reverse_differentiable:
                g = eqx.filter_grad(lambda m: loss(m(*args)))
                g = eqx.filter_jit(g) if jit else g
                tree = eqx.filter(g(self.model), eqx.is_array)
            else:
                raise NotImplementedError("forward-mode grads of an Equinox case")
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {jax.tree_util.keystr(p): x for p, x in flat}

    def dot_fed_paths(self) -> frozenset:
        """:func:`dot_fed_paths` over :meth:`param_tree` (the program is traced as a function of
        exactly that tree, so the paths are comparable with ``weight_paths``)."""
        args = self.example_args
        if self.kind in ("fn", "linen"):
            return dot_fed_paths(self.model, self.params, *args)
        if self.kind == "eqx":
            import equinox as eqx
            static = eqx.partition(self.model, eqx.is_array)[1]
            return dot_fed_paths(lambda d, *a: eqx.combine(d, static)(*a), self.param_tree(), *args)
        from flax import nnx
        graphdef, params, rest = nnx.split(nnx.clone(self.model), nnx.Param, ...)

        def fn(pure, rest, *a):
            state = jax.tree_util.tree_map(lambda x: x, params)
            nnx.replace_by_pure_dict(state, pure)
            return nnx.merge(graphdef, state, rest)(*a)
        return dot_fed_paths(fn, self.param_tree(), rest, *args)

    def make_jaxpr(self, *args):
        """The closed jaxpr of the forward program (params are inputs; modules are split)."""
        args = args or self.example_args
        if self.kind in ("fn", "linen"):
            return jax.make_jaxpr(self.model)(self.params, *args)
        if self.kind == "nnx":
            from flax import nnx
            graphdef, state = nnx.split(nnx.clone(self.model))
            return jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)
        import equinox as eqx
        dyn, static = eqx.partition(self.model, eqx.is_array)
        return jax.make_jaxpr(lambda d, *a: eqx.combine(d, static)(*a))(dyn, *args)


def _call_module(module, *args):
    return module(*args)


@functools.lru_cache(maxsize=128)
def _jitted(fn_or_kind):
    """One jitted wrapper per function (or per module kind), so compilations are reused."""
    if fn_or_kind == "nnx":
        from flax import nnx
        return nnx.jit(_call_module)
    if fn_or_kind == "eqx":
        import equinox as eqx
        return eqx.filter_jit(_call_module)
    return jax.jit(fn_or_kind)


@dataclasses.dataclass(frozen=True)
class ZooCase:
    """A named zoo entry; ``build()`` returns a fresh :class:`ZooModel`."""

    name: str
    kind: str
    build: Callable[[], ZooModel]

    def __repr__(self):  # pytest ids and failure messages
        return f"ZooCase({self.name!r}, {self.kind!r})"


# ---------------------------------------------------------------------------------------------
# Utilities
# ---------------------------------------------------------------------------------------------

# Canonical names of higher-order primitives; JAX renamed some across versions.
_CANONICAL = {
    "pjit": "jit", "jit": "jit", "closed_call": "jit", "core_call": "jit",
    "remat2": "remat", "checkpoint": "remat", "remat": "remat",
    "custom_vjp_call_jaxpr": "custom_vjp_call", "custom_vjp_call": "custom_vjp_call",
    "custom_jvp_call": "custom_jvp_call",
    "scan": "scan", "while": "while", "cond": "cond",
}


def _subjaxprs(params):
    for v in params.values():
        for item in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(item, "jaxpr") and hasattr(getattr(item, "jaxpr"), "eqns"):
                yield item.jaxpr


def higher_order_primitives(jaxpr) -> set[str]:
    """Canonical names of every higher-order primitive in ``jaxpr``, recursively.

    Unknown higher-order primitives are returned under their own name.
    """
    found: set[str] = set()
    stack = [getattr(jaxpr, "jaxpr", jaxpr)]
    while stack:
        j = stack.pop()
        for eqn in j.eqns:
            subs = list(_subjaxprs(eqn.params))
            if subs:
                name = eqn.primitive.name
                found.add(_CANONICAL.get(name, name))
                stack.extend(subs)
    return found


# Ops that only move or cast data: a weight that reaches a dot through them is still a weight.
_LAYOUT_PRIMITIVES = frozenset({
    "transpose", "reshape", "convert_element_type", "broadcast_in_dim", "squeeze",
    "expand_dims", "slice", "dynamic_slice", "copy", "copy_p", "reduce_precision"})
# Higher-order primitives whose outputs are their region's outputs, one to one.
_ONE_TO_ONE_OUT = frozenset({
    "jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
    "custom_vjp_call", "custom_vjp_call_jaxpr", "cond"})


def _regions(eqn):
    """(sub-jaxpr, k) pairs: the region's invars line up with ``eqn.invars[k:]``."""
    p, name = eqn.params, eqn.primitive.name
    if name == "cond":
        return [(b, 1) for b in p["branches"]]
    if name == "while":  # body invars: body consts + carries (cond consts come first)
        return [(p["body_jaxpr"], p["cond_nconsts"])]
    # scan (consts, carry, xs: sliced), jit, remat, custom_jvp / custom_vjp: one to one.
    return [(p[k], 0) for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in p]


def _dot_fed(jaxpr, tracked: set[int]):
    """Which ``tracked`` invars reach a dot_general operand through layout-only ops.

    Follows values into every region (nested jit, scan, cond, while body, remat, custom_jvp /
    custom_vjp) and back out of one-to-one regions. Returns (invar indices, and for each outvar
    the tracked invars it is a layout view of).
    """
    j = getattr(jaxpr, "jaxpr", jaxpr)
    origin = {v: {i} for i, v in enumerate(j.invars) if i in tracked}
    hits: set[int] = set()
    for eqn in j.eqns:
        ins = [set() if hasattr(v, "val") else origin.get(v, set()) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general":
            hits.update(*ins)
        elif name in _LAYOUT_PRIMITIVES:
            if ins and ins[0]:
                for o in eqn.outvars:
                    origin[o] = set(ins[0])
        else:
            for sub, k in _regions(eqn):
                sj = getattr(sub, "jaxpr", sub)
                sub_tracked = {i: ins[k + i] for i in range(min(len(sj.invars), len(ins) - k))
                               if ins[k + i]}
                if not sub_tracked:
                    continue
                sub_hits, sub_outs = _dot_fed(sj, set(sub_tracked))
                for i in sub_hits:
                    hits |= sub_tracked[i]
                if name in _ONE_TO_ONE_OUT:
                    for o, srcs in zip(eqn.outvars, sub_outs):
                        for i in srcs:
                            origin.setdefault(o, set()).update(sub_tracked[i])
    outs = [set() if hasattr(v, "val") else set(origin.get(v, ())) for v in j.outvars]
    return hits, outs


def dot_fed_paths(fn, params, *args) -> frozenset:
    """``keystr`` paths of the leaves of ``params`` that reach a dot_general in
    ``fn(params, *args)`` through layout-only ops (transpose, reshape, casts, slicing), across nested regions.

    An independent, deliberately small re-derivation of ``weight_paths`` from the jaxpr (the core
    has its own, richer analysis): the sanity tests use it to check that every case's hand-written
    ``weight_paths`` matches what the program really does.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    closed = jax.make_jaxpr(fn)(params, *args)   # params' leaves are the first invars
    hits, _ = _dot_fed(closed, set(range(len(paths))))
    return frozenset(paths[i] for i in hits)


def relative_error(a, b) -> float:
    """``||a - b|| / ||b||``: Frobenius norm over all leaves of two pytrees, ``b`` the reference.

    Computed on the host in float64: tiny arrays, and no eager XLA compilation per new shape.
    Returns ``||a - b||`` when ``b`` is all zeros.
    """
    la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise ValueError("relative_error: pytrees of different structure or shapes")
    num = math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(la, lb)))
    den = math.sqrt(sum(float(np.sum(y ** 2)) for y in lb))
    return num / den if den > 0 else num


def fake_quant_int8(w) -> jax.Array:
    """Symmetric int8 round-to-nearest with one scale for the whole tensor, dequantized.

    The coarsest int8 scheme: per-channel or per-group scales are never larger than this one.
    Host-side NumPy (no eager XLA compilation per weight shape).
    """
    w = np.asarray(w, np.float32)
    scale = float(np.max(np.abs(w))) / 127.0 or 1.0
    return jnp.asarray(np.clip(np.round(w / scale), -127, 127) * scale, dtype=jnp.float32)


def _rng(seed: int) -> np.random.Generator:
    """Seeded NumPy generator: host-side init is deterministic and avoids compiling eager JAX
    random ops for every new shape (which would dominate build time on CPU)."""
    return np.random.default_rng(seed)


def _normal(rng: np.random.Generator, shape, scale=1.0) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype=jnp.float32)


def _init(rng: np.random.Generator, shape, fan_in=None) -> jax.Array:
    """Gaussian init with std 1/sqrt(fan_in): activations stay O(1) through the matmuls."""
    fan_in = fan_in if fan_in is not None else shape[-2]
    return _normal(rng, shape, 1.0 / math.sqrt(fan_in))


def _ids(rng: np.random.Generator, shape, vocab) -> jax.Array:
    return jnp.asarray(rng.integers(0, vocab, shape), dtype=jnp.int32)


def _fill(shapes, seed: int, *, fan_in_axis: int = -2):
    """Concrete seeded values for a pytree of ``jax.ShapeDtypeStruct`` (from ``eval_shape``).

    Why: library initializers run eagerly op by op (or need a jit compilation) and cost seconds of
    CPU per model; tracing the initializer for shapes and filling on the host is instant.
    By leaf name: ndim >= 2 -> N(0, 1/fan_in) (fan_in = ``shape[fan_in_axis]``); ``bias`` ->
    N(0, 0.01); ``mean`` -> 0; ``scale`` / ``var`` -> 1; PRNG keys -> a seeded key; integer
    counters -> 0.
    """
    rng = _rng(seed)

    def one(path, s):
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(s.dtype, jnp.floating):
            return jnp.asarray(np.zeros(s.shape, s.dtype))
        if len(s.shape) >= 2 and not any(k in name for k in ("'bias'", "'scale'", "'mean'",
                                                                "'var'")):
            return _normal(rng, s.shape, 1.0 / math.sqrt(s.shape[fan_in_axis]))
        if "'bias'" in name or ".bias" in name:
            return _normal(rng, s.shape, 0.1)
        if "'mean'" in name:
            return jnp.asarray(np.zeros(s.shape, np.float32))
        return jnp.asarray(np.ones(s.shape, np.float32))

    return jax.tree_util.tree_map_with_path(one, shapes)


def _mse_loss(out):
    return jnp.mean(jnp.square(out))


def _xent_loss(labels):
    """Mean next-token cross entropy against fixed ``labels`` (logits [..., vocab])."""
    labels = jnp.asarray(labels)

    def loss(logits):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
    return loss


def _paths(*keys_lists) -> frozenset:
    """``_paths(("a", "w"), ("b",))`` -> {"['a']['w']", "['b']"}."""
    return frozenset("".join(f"[{k!r}]" for k in ks) for ks in keys_lists)


# ---------------------------------------------------------------------------------------------
# Plain-function cases
# ---------------------------------------------------------------------------------------------

@jax.custom_jvp
def _softplus(x):
    """Softplus with a hand-written JVP (a custom_jvp applied to a matmul result)."""
    return jnp.logaddexp(x, 0.0)


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _softplus(x), jax.nn.sigmoid(x) * dx


@jax.custom_jvp
def _tanh_proj(x, w):
    """tanh(x @ w) with a hand-written JVP: the weight is used *inside* the custom_jvp body."""
    return jnp.tanh(x @ w)


@_tanh_proj.defjvp
def _tanh_proj_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    y = _tanh_proj(x, w)
    return y, (1.0 - y * y) * (dx @ w + x @ dw)


@jax.custom_vjp
def _linear_vjp(x, w):
    """x @ w with a hand-written VJP: the weight is an operand of a custom_vjp function."""
    return x @ w


def _linear_vjp_fwd(x, w):
    return x @ w, (x, w)


def _linear_vjp_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_linear_vjp.defvjp(_linear_vjp_fwd, _linear_vjp_bwd)


@jax.custom_vjp
def _clip_grad(x):
    """Identity forward, clipped cotangent backward (a custom_vjp applied to activations)."""
    return x


_clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))


def _scan_remat_cond_custom() -> ZooModel:
    """Scan over stacked [L, d, d] layers; remat body; cond inside; custom_jvp / custom_vjp."""
    L, d, din, dout, b = 3, 16, 8, 8, 4
    r = _rng(0)
    params = {
        "w_in": _init(r, (din, d)),
        "layers": {"w": _init(r, (L, d, d)), "b": _normal(r, (L, d), 0.1),
                   "w_alt": _init(r, (L, d, d))},
        "w_jvp": _init(r, (d, d)),
        "w_vjp": _init(r, (d, d)),
        "w_out": _init(r, (d, dout)),
    }
    x = _normal(r, (b, din))

    def fn(params, x):
        h = _softplus(x @ params["w_in"]) - 0.5           # custom_jvp on a matmul result

        @jax.checkpoint
        def body(h, layer):
            i, w, bias, w_alt = layer
            # The branch depends on the layer index only, never on the (quantized) weights.
            z = lax.cond(i % 2 == 0,
                         lambda h: jnp.tanh(h @ w + bias),
                         lambda h: jax.nn.relu(h @ w_alt.T) - 0.3,
                         h)
            return h + z, None

        ls = params["layers"]
        h, _ = lax.scan(body, h, (jnp.arange(L), ls["w"], ls["b"], ls["w_alt"]))
        h = _tanh_proj(h, params["w_jvp"])                # weight inside a custom_jvp body
        h = _clip_grad(_linear_vjp(h, params["w_vjp"]))   # weight inside a custom_vjp
        return h @ params["w_out"]

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("w_in",), ("layers", "w"), ("layers", "w_alt"), ("w_jvp",),
                            ("w_vjp",), ("w_out",)),
        other_paths=_paths(("layers", "b")),   # stacked [L, d] biases: 2-D, not matmul weights
        int8_rtol=0.05,
        primitives={"scan", "remat", "cond", "custom_jvp_call", "custom_vjp_call"})


def _custom_derivative_weights() -> ZooModel:
    """Weights only reachable inside custom_jvp / custom_vjp bodies, under a nested jit."""
    d, b = 8, 3
    r = _rng(1)
    params = {"a": _init(r, (d, d)), "b": _init(r, (d, d)), "c": _init(r, (d, d))}
    x = _normal(r, (b, d))

    def fn(params, x):
        h = _tanh_proj(x, params["a"])
        h = jax.jit(lambda h, w: _linear_vjp(h, w))(h, params["b"])
        return _softplus(h @ params["c"])

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("a",), ("b",), ("c",)), int8_rtol=0.05,
        primitives={"jit", "custom_jvp_call", "custom_vjp_call"})


def _jit_while() -> ZooModel:
    """Nested jit around a ``lax.while_loop`` whose body reads a shared weight and w[i].

    The trip count depends on the data-independent counter only, so quantization cannot change
    it. Reverse-mode differentiation of ``while`` is impossible: this case uses forward mode.
    """
    L, d, b = 3, 8, 3
    r = _rng(2)
    params = {"shared": _init(r, (d, d)), "stack": _init(r, (L, d, d)),
              "head": _init(r, (d, 4))}
    x = _normal(r, (b, d))

    def fn(params, x):
        @jax.jit
        def outer(params, x):
            @jax.jit
            def inner(params, h):
                def cond(state):
                    i, _ = state
                    return i < L

                def body(state):
                    i, h = state
                    w_i = lax.dynamic_index_in_dim(params["stack"], i, keepdims=False)
                    return i + 1, jnp.tanh(h @ w_i + 0.5 * (h @ params["shared"]))

                _, h = lax.while_loop(cond, body, (jnp.int32(0), h))
                return h
            return inner(params, x) @ params["head"]
        return outer(params, x)

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("shared",), ("stack",), ("head",)), int8_rtol=0.05,
        reverse_differentiable=False, primitives={"jit", "while"})


def _fori_stacked() -> ZooModel:
    """``lax.fori_loop`` with static bounds (traced as scan) indexing stacked weights ``w[i]``."""
    L, d, b = 4, 8, 3
    r = _rng(3)
    params = {"w": _init(r, (L, d, d)), "out": _init(r, (d, d))}
    x = _normal(r, (b, d))

    def fn(params, x):
        w = params["w"]
        h = lax.fori_loop(0, L, lambda i, h: h + jnp.tanh(h @ w[i]), x)  # w[i]: dynamic_slice
        return jax.jit(lambda h, o: h @ o)(h, params["out"])

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("w",), ("out",)), int8_rtol=0.05, primitives={"scan", "jit"})


def _tied_embedding() -> ZooModel:
    """One [V, d] table used as a gather lookup and, transposed, as the output projection."""
    V, d, b, s = 64, 16, 2, 6
    r = _rng(4)
    params = {"embed": _normal(r, (V, d)), "mlp": _init(r, (d, d))}
    ids = _ids(r, (b, s), V)

    def fn(params, ids):
        e = params["embed"]
        h = e[ids]                                         # gather
        h = h + jnp.tanh(h @ params["mlp"])
        return h @ e.T / math.sqrt(d)                      # transpose -> dot (tied)

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(ids,),
        loss=_xent_loss(np.roll(np.asarray(ids), -1, axis=1)),
        weight_paths=_paths(("embed",), ("mlp",)), int8_rtol=0.05)


def _layout_ops() -> ZooModel:
    """Weights reach their dots through transpose, reshape, astype(bf16) and a 2-axis einsum."""
    d, h, hd, b = 16, 4, 4, 3
    r = _rng(5)
    params = {
        "w_t": _init(r, (d, d), fan_in=d),             # stored [out, in]: used as w_t.T
        "w_heads": _init(r, (d, h, hd), fan_in=d),     # [d, h, hd] -> reshape [d, h*hd]
        "w_bf16": _init(r, (d, d)),                    # cast to bfloat16 before the dot
        "w_o": _init(r, (h, hd, d), fan_in=h * hd),    # einsum contracting (h, hd)
        "w_perm": _init(r, (d, d)),                    # jnp.transpose + matmul on the left
    }
    x = _normal(r, (b, d))

    def fn(params, x):
        y = jnp.tanh(x @ params["w_t"].T)
        y = y @ params["w_heads"].reshape(d, h * hd)
        y = jax.nn.gelu(y)
        y = (y.astype(jnp.bfloat16) @ params["w_bf16"].astype(jnp.bfloat16)).astype(jnp.float32)
        y = jnp.einsum("bhk,hkd->bd", y.reshape(b, h, hd), params["w_o"])
        return jnp.transpose(jnp.transpose(params["w_perm"]) @ y.T)   # (w^T @ y^T)^T = y @ w

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("w_t",), ("w_heads",), ("w_bf16",), ("w_o",), ("w_perm",)),
        int8_rtol=0.05)


def _conv_attention() -> ZooModel:
    """A conv stem (its kernel feeds a convolution, not a dot) + multi-head self-attention."""
    b, H, W, C, F, heads = 2, 6, 6, 3, 16, 4
    hd = F // heads
    r = _rng(6)
    params = {
        "conv": _init(r, (3, 3, C, F), fan_in=9 * C),
        "wq": _init(r, (F, F)), "wk": _init(r, (F, F)), "wv": _init(r, (F, F)),
        "wo": _init(r, (heads, hd, F), fan_in=F),
        "head": _init(r, (F, 5)),
        "ln_scale": jnp.asarray(np.ones((F,), np.float32)),
    }
    x = _normal(r, (b, H, W, C))

    def fn(params, x):
        y = lax.conv_general_dilated(x, params["conv"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        t = jax.nn.relu(y).reshape(b, -1, F)               # tokens [b, T, F]
        t = t / jnp.sqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6) * params["ln_scale"]
        q = (t @ params["wq"]).reshape(b, -1, heads, hd)
        kk = (t @ params["wk"]).reshape(b, -1, heads, hd)
        v = (t @ params["wv"]).reshape(b, -1, heads, hd)
        a = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, kk) / math.sqrt(hd), axis=-1)
        o = jnp.einsum("bhqs,bshk->bqhk", a, v)
        t = t + jnp.einsum("bqhk,hkf->bqf", o, params["wo"])
        return jnp.mean(t, axis=1) @ params["head"]

    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("wq",), ("wk",), ("wv",), ("wo",), ("head",)),
        other_paths=_paths(("conv",)), int8_rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Flax NNX
# ---------------------------------------------------------------------------------------------

_NNX_INIT: dict = {}


def _nnx_init(cls):
    """(graphdef, state) of ``cls(8, 16, 4, rngs)``: shapes by ``nnx.eval_shape``, seeded
    values by :func:`_fill` (computed once)."""
    from flax import nnx
    if "net" not in _NNX_INIT:
        graphdef, shapes = nnx.split(
            nnx.eval_shape(lambda: cls(8, 16, 4, nnx.Rngs(params=0, dropout=1))))
        _NNX_INIT["net"] = graphdef, _fill(shapes, 7)
    return _NNX_INIT["net"]


def _nnx_mlp() -> ZooModel:
    """NNX: Linear, LayerNorm, an MLP with deterministic Dropout, a training-mode BatchNorm.

    The BatchNorm normalizes with batch statistics and updates its running averages (BatchStat
    state) on every call; Dropout holds an ``nnx.Rngs`` stream (RngKey / RngCount state) that it
    does not consume in deterministic mode. Outputs are therefore deterministic.
    """
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, d, hidden, rngs):
            self.up = nnx.Linear(d, hidden, rngs=rngs)
            self.dropout = nnx.Dropout(0.1, deterministic=True, rngs=rngs)
            self.down = nnx.Linear(hidden, d, rngs=rngs)

        def __call__(self, x):
            return self.down(self.dropout(jax.nn.gelu(self.up(x))))

    class Net(nnx.Module):
        def __init__(self, din, d, dout, rngs):
            self.embed = nnx.Linear(din, d, rngs=rngs)
            self.norm = nnx.LayerNorm(d, rngs=rngs)
            self.mlp = MLP(d, 2 * d, rngs)
            self.bn = nnx.BatchNorm(d, use_running_average=False, rngs=rngs)
            self.head = nnx.Linear(d, dout, use_bias=False, rngs=rngs)

        def __call__(self, x):
            h = self.embed(x)
            h = h + self.mlp(self.norm(h))
            return self.head(jax.nn.relu(self.bn(h)))

    # Initialized once (cached); every build merges a fresh module: NNX modules are mutable.
    model = nnx.merge(*_nnx_init(Net))
    x = _normal(_rng(107), (6, 8))
    return ZooModel(
        kind="nnx", model=model, params=None, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("embed", "kernel"), ("mlp", "up", "kernel"),
                            ("mlp", "down", "kernel"), ("head", "kernel")),
        int8_rtol=0.05)


# ---------------------------------------------------------------------------------------------
# Flax Linen
# ---------------------------------------------------------------------------------------------

def _linen_scan_remat() -> ZooModel:
    """Linen: ``nn.scan`` over ``nn.remat`` blocks (kernels stacked [L, d, d]) + Dense in/out."""
    net, variables, x = _linen_net()
    return ZooModel(
        kind="linen", model=net.apply, params=variables, example_args=(x,), loss=_mse_loss,
        weight_paths=_paths(("params", "embed", "kernel"), ("params", "head", "kernel"),
                            ("params", "blocks", "up", "kernel"),
                            ("params", "blocks", "down", "kernel")),
        # Scanned biases and LayerNorm params are stacked [L, n]: 2-D but not matmul weights.
        other_paths=_paths(*[("params", "blocks", m, p) for m, p in (
            ("up", "bias"), ("down", "bias"), ("norm", "scale"), ("norm", "bias"))]),
        int8_rtol=0.05, primitives={"scan", "remat"})


@functools.lru_cache(maxsize=None)
def _linen_net():
    """The Linen module, its variables (immutable; shapes by ``eval_shape``, values by
    :func:`_fill`) and an input."""
    import flax.linen as nn

    L, d = 3, 16

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            y = nn.Dense(2 * d, name="up")(nn.LayerNorm(name="norm")(h))
            return h + nn.Dense(d, name="down")(jnp.tanh(y)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(d, name="embed")(x)
            blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                             split_rngs={"params": True}, length=L)
            h, _ = blocks(name="blocks")(h, None)
            return nn.Dense(4, name="head")(h)

    net = Net()
    x = _normal(_rng(108), (3, 8))
    variables = _fill(jax.eval_shape(net.init, jax.random.PRNGKey(8), x), 8)
    return net, variables, x


# ---------------------------------------------------------------------------------------------
# Equinox
# ---------------------------------------------------------------------------------------------

def _eqx_mlp() -> ZooModel:
    """Equinox: an ``eqx.nn.MLP`` and an ``eqx.nn.Linear``, vmapped over the batch.

    ``activation`` is an ordinary (non-static) field holding a function, so the module pytree has
    a non-array leaf that a transform must carry through untouched.
    """
    net = _eqx_net()
    x = _normal(_rng(109), (3, 8))
    return ZooModel(
        kind="eqx", model=net, params=None, example_args=(x,), loss=_mse_loss,
        weight_paths=frozenset({".mlp.layers[0].weight", ".mlp.layers[1].weight",
                                ".mlp.layers[2].weight", ".proj.weight"}),
        int8_rtol=0.05)


@functools.lru_cache(maxsize=None)
def _eqx_net():
    """The Equinox module (immutable, so one cached instance is safe to share)."""
    import equinox as eqx

    class Net(eqx.Module):
        mlp: eqx.nn.MLP
        proj: eqx.nn.Linear
        activation: Callable

        def __call__(self, x):
            return jax.vmap(lambda v: self.proj(self.activation(self.mlp(v))))(x)

    def make(key):
        k1, k2 = jax.random.split(key)
        return Net(mlp=eqx.nn.MLP(8, 16, 16, depth=2, activation=jax.nn.gelu, key=k1),
                   proj=eqx.nn.Linear(16, 4, key=k2), activation=jnp.tanh)

    shapes = eqx.filter_eval_shape(make, jax.random.PRNGKey(9))
    arrays, static = eqx.partition(shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    # Equinox stores Linear weights as [out, in]: fan_in is the last axis.
    return eqx.combine(_fill(arrays, 9, fan_in_axis=-1), static)


# ---------------------------------------------------------------------------------------------
# transformers (third-party Flax models, traced as plain functions of their params)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hf_model(name: str):
    """A tiny randomly initialized transformers Flax model and its params (cached).

    ``_do_init=False``, then our own seeded NumPy init over the shapes of ``init_weights``
    (``jax.eval_shape``: tracing only). The default ``_do_init=True`` compiles the initializer,
    which costs several seconds on CPU for no benefit here.
    """
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import pytest  # the zoo is test support: a missing optional dependency is a skip
    tf = pytest.importorskip("transformers", reason="transformers (Flax classes) not installed")

    flax_class = {"llama": "FlaxLlamaForCausalLM", "gpt2": "FlaxGPT2LMHeadModel"}.get(name)
    try:  # transformers 5.x removed its Flax classes
        getattr(tf, flax_class)
    except (AttributeError, ImportError, TypeError):
        pytest.skip(f"transformers {tf.__version__} has no {flax_class} (Flax classes left in 5.x)")
    if name == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=False)
        cls = tf.FlaxLlamaForCausalLM
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            tie_word_embeddings=True)
        cls = tf.FlaxGPT2LMHeadModel
    else:
        raise KeyError(name)
    model = cls(cfg, input_shape=(1, 8), seed=0, dtype=jnp.float32, _do_init=False)
    shapes = jax.eval_shape(lambda key: model.init_weights(key, (1, 8)), jax.random.PRNGKey(0))
    rng = _rng(10)

    def init(path, s):
        name = jax.tree_util.keystr(path)
        if len(s.shape) >= 2:   # kernels and embeddings; std 0.2 keeps the 32-wide model O(1)
            return _normal(rng, s.shape, 0.2)
        if name.endswith("['bias']"):
            return _normal(rng, s.shape, 0.02)
        return jnp.asarray(np.ones(s.shape, np.float32))  # norm scales / weights
    return model, jax.tree_util.tree_map_with_path(init, shapes)


def _hf_case(name: str, other: Callable[[str], bool]) -> ZooModel:
    model, params = _hf_model(name)

    def fn(params, ids):
        return model(ids, params=params).logits

    ids = _ids(_rng(110), (2, 8), 128)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    nd2 = [jax.tree_util.keystr(p) for p, x in flat if x.ndim >= 2]
    return ZooModel(
        kind="fn", model=fn, params=params, example_args=(ids,),
        loss=_xent_loss(np.roll(np.asarray(ids), -1, axis=1)),
        weight_paths=frozenset(p for p in nd2 if not other(p)),
        other_paths=frozenset(p for p in nd2 if other(p)),
        # Per-tensor int8 measured ~0.04 (llama) / ~0.025 (gpt2): attention logits amplify it.
        int8_rtol=0.1, primitives={"jit"})


def _hf_llama() -> ZooModel:
    """transformers FlaxLlamaForCausalLM (untied): the token embedding is gather-only."""
    return _hf_case("llama", lambda p: "embed_tokens" in p)


def _hf_gpt2() -> ZooModel:
    """transformers FlaxGPT2LMHeadModel: tied ``wte`` (gather + transposed LM head); [out, in]
    Conv1D kernels used through a transpose; ``wpe`` is gather-only."""
    return _hf_case("gpt2", lambda p: "wpe" in p)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def _fresh_copies(builder: Callable[[], ZooModel]) -> Callable[[], ZooModel]:
    """Builds once; every call returns a copy with new pytree containers (same arrays).

    NNX builders are not wrapped: they already return a new module each call.
    """
    cached = functools.lru_cache(maxsize=None)(builder)

    @functools.wraps(builder)
    def build() -> ZooModel:
        zm = cached()
        copy = lambda t: jax.tree_util.tree_map(lambda x: x, t)
        return dataclasses.replace(zm, params=copy(zm.params),
                                   example_args=tuple(zm.example_args))
    return build


CASES: list[ZooCase] = [
    ZooCase("scan_remat_cond_custom", "fn", _fresh_copies(_scan_remat_cond_custom)),
    ZooCase("custom_derivative_weights", "fn", _fresh_copies(_custom_derivative_weights)),
    ZooCase("jit_while", "fn", _fresh_copies(_jit_while)),
    ZooCase("fori_stacked", "fn", _fresh_copies(_fori_stacked)),
    ZooCase("tied_embedding", "fn", _fresh_copies(_tied_embedding)),
    ZooCase("layout_ops", "fn", _fresh_copies(_layout_ops)),
    ZooCase("conv_attention", "fn", _fresh_copies(_conv_attention)),
    ZooCase("nnx_mlp", "nnx", _nnx_mlp),
    ZooCase("linen_scan_remat", "linen", _fresh_copies(_linen_scan_remat)),
    ZooCase("eqx_mlp", "eqx", _fresh_copies(_eqx_mlp)),
    ZooCase("hf_llama", "fn", _fresh_copies(_hf_llama)),
    ZooCase("hf_gpt2", "fn", _fresh_copies(_hf_gpt2)),
]

_BY_NAME = {c.name: c for c in CASES}
assert len(_BY_NAME) == len(CASES), "duplicate zoo case names"


def get(name: str) -> ZooCase:
    """The zoo case called ``name`` (KeyError listing the known names otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo case {name!r}; known: {sorted(_BY_NAME)}") from None


def names(kind: str | None = None) -> list[str]:
    """Case names, optionally only those of one kind."""
    return [c.name for c in CASES if kind is None or c.kind == kind]
