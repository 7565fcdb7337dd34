"""jaxpass.transform end to end on small programs: identity, int8, jit/grad/vmap, adapters."""

import dataclasses
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxpass
from jaxpass import passes
from jaxpass.passes.quantize import QArray


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _params(key=0, L=3, d=16, out=8):
    k = jax.random.split(jax.random.key(key), 3)
    return {"layers": {"w": jax.random.normal(k[0], (L, d, d)) / np.sqrt(d)},
            "head": jax.random.normal(k[1], (out, d)) / np.sqrt(d)}


@jax.custom_vjp
def _clip_grad(x):
    return x


_clip_grad.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))


def _model(p, x):
    def body(c, w):
        return jax.checkpoint(lambda c: jnp.tanh(c @ w))(c), None
    c, _ = lax.scan(body, x, p["layers"]["w"])
    c = jax.jit(lambda a: a * 2)(c)
    c = lax.cond(c.sum() > 0, lambda a: a + 1, lambda a: a - 1, c)
    c = _clip_grad(jax.nn.gelu(c))
    return c @ p["head"].T.astype(jnp.bfloat16)


X = jax.random.normal(jax.random.key(7), (4, 16))


def test_identity_is_bit_exact_outputs_and_grads():
    p = _params()
    t = jaxpass.transform(_model, [], params=p, example_args=(X,))
    chex.assert_trees_all_equal(jax.jit(t.apply)(t.params, X), jax.jit(_model)(p, X))
    g = jax.jit(jax.grad(lambda p, x: t.apply(p, x).sum()))(p, X)
    g0 = jax.jit(jax.grad(lambda p, x: _model(p, x).sum()))(p, X)
    chex.assert_trees_all_equal(g, g0)
    assert t.params is p or jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: a is b, t.params, p))


def test_int8_per_channel_quantizes_stacked_weights_per_layer():
    p = _params()
    t = jaxpass.transform(_model, [passes.Quantize(weights="int8")], params=p, example_args=(X,))
    w = t.params["layers"]["w"]
    assert isinstance(w, QArray) and w.qvalue.dtype == jnp.int8
    assert w.scale.shape == (3, 1, 16)  # one scale per layer and output channel
    assert t.params["head"].scale.shape == (8, 1)  # head is used transposed: contracts axis 1
    # Each dequantized element is within half a step of the original.
    for name, wq in (("w", w), ("head", t.params["head"])):
        orig = p["layers"]["w"] if name == "w" else p["head"]
        err = np.abs(np.asarray(wq.materialize()) - np.asarray(orig))
        assert np.all(err <= np.asarray(wq.scale) / 2 + 1e-7)
    y, y0 = jax.jit(t.apply)(t.params, X), _model(p, X)
    assert y.dtype == y0.dtype and y.shape == y0.shape
    assert _rel(y, y0) < 2e-2
    rep = t.report[0]
    assert len(rep.changed) == 2 and rep.bytes_after < 0.3 * rep.bytes_before + 200
    assert len(rep.events_of("rewrite")) == 2 and not rep.events_of("materialize")
    assert rep.output_error is not None and rep.output_error < 2e-2
    assert t.graph.count("jaxpass.quantized_dot_general") == 2
    assert t.graph.count("dot_general") == 0
    text = str(t.graph)
    assert "params['layers']['w'].qvalue" in text and "jaxpass.quantized_dot_general" in text


def test_apply_under_jit_grad_vmap_and_new_shapes():
    p = _params()
    t = jaxpass.transform(_model, [passes.Quantize()], params=p, example_args=(X,))
    x2 = jax.random.normal(jax.random.key(1), (3, 5, 16))  # other batch shape
    y = jax.vmap(lambda x: t.apply(t.params, x))(x2)
    y_ref = jnp.stack([t.apply(t.params, x) for x in x2])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert _rel(y, jax.vmap(lambda x: _model(p, x))(x2)) < 2e-2
    # Gradients flow to the activations and to the float scales.
    gx = jax.grad(lambda x: t.apply(t.params, x).astype(jnp.float32).sum())(X)
    gx0 = jax.grad(lambda x: _model(p, x).astype(jnp.float32).sum())(X)
    assert _rel(gx, gx0) < 5e-2
    gs = jax.grad(lambda s: t.apply({**t.params, "head": dataclasses.replace(t.params["head"], scale=s)}, X)
                  .astype(jnp.float32).sum())(t.params["head"].scale)
    assert np.all(np.isfinite(gs)) and np.any(gs != 0)


def test_weight_inside_custom_jvp_is_dequantized_at_the_boundary():
    @jax.custom_jvp
    def layer(x, w):
        return jnp.sin(x @ w)

    layer.defjvp(lambda pr, tn: (layer(*pr), jnp.cos(pr[0] @ pr[1]) * (tn[0] @ pr[1] + pr[0] @ tn[1])))
    p = {"w": jax.random.normal(jax.random.key(3), (16, 16)) / 4}
    f = lambda p, x: layer(x, p["w"])
    t = jaxpass.transform(f, [passes.Quantize()], params=p, example_args=(X,))
    rep = t.report[0]
    assert rep.events_of("boundary") and any("custom derivative" in n for n in rep.notes)
    assert _rel(t(X), f(p, X)) < 2e-2
    g = jax.grad(lambda x: t.apply(t.params, x).sum())(X)
    assert _rel(g, jax.grad(lambda x: f(p, x).sum())(X)) < 5e-2


def test_tied_embedding_gather_reads_dequantized_weight():
    p = {"emb": jax.random.normal(jax.random.key(2), (32, 16))}

    def f(p, ids):
        h = p["emb"][ids]
        return h @ p["emb"].T

    ids = jnp.array([[1, 5, 7]])
    t = jaxpass.transform(f, [passes.Quantize()], params=p, example_args=(ids,))
    rep = t.report[0]
    assert rep.events_of("rewrite") and rep.events_of("materialize")
    assert _rel(t(ids), f(p, ids)) < 2e-2


def test_nnx_module_state_is_threaded_and_module_not_mutated():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(16, 32, rngs=rngs)
            self.bn = nnx.BatchNorm(32, use_running_average=False, rngs=rngs)
            self.l2 = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    net = Net(nnx.Rngs(0))
    before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(net)))
    t0 = jaxpass.transform(net, [], example_args=(X,))
    ref_net = nnx.clone(net)
    chex.assert_trees_all_equal(t0(X), nnx.jit(lambda m, x: m(x))(ref_net, X))  # both jitted
    chex.assert_trees_all_equal(t0.state["bn"]["mean"], nnx.state(ref_net)["bn"]["mean"][...])
    t = jaxpass.transform(net, [passes.Quantize()], example_args=(X,))
    assert set(t.params["l1"]) == {"kernel", "bias"} and isinstance(t.params["l1"]["kernel"], QArray)
    assert _rel(t(X), nnx.clone(net)(X)) < 2e-2
    chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(net))), before)


def test_equinox_and_linen_models():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(16, 4, 32, 2, key=jax.random.key(0))
    t = jaxpass.transform(mlp, [passes.Quantize()], example_args=(X[0],))
    assert isinstance(t.params.layers[0].weight, QArray)
    assert _rel(t(X[0]), mlp(X[0])) < 2e-2
    assert _rel(jax.vmap(lambda x: t.apply(t.params, x))(X), jax.vmap(mlp)(X)) < 2e-2

    import flax.linen as nn
    mod = nn.Sequential([nn.Dense(32), nn.relu, nn.Dense(4)])
    variables = mod.init(jax.random.key(0), X)
    t = jaxpass.transform(mod.apply, [passes.Quantize()], params=variables, example_args=(X,))
    assert isinstance(t.params["params"]["layers_0"]["kernel"], QArray)
    assert _rel(t(X), mod.apply(variables, X)) < 2e-2


def test_abstract_params_transform_without_allocation():
    p = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _params())
    x = jax.ShapeDtypeStruct((4, 16), jnp.float32)
    t = jaxpass.transform(_model, [passes.Quantize()], params=p, example_args=(x,))
    w = t.params["layers"]["w"]
    assert isinstance(w.qvalue, jax.ShapeDtypeStruct) and w.qvalue.dtype == jnp.int8
    assert t.report[0].output_error is None
    assert t.graph.count("jaxpass.quantized_dot_general") == 2


def test_passes_are_picklable_and_composable_with_include_exclude():
    q = passes.Quantize(weights="int8", include=r"layers")
    assert pickle.loads(pickle.dumps(q)) == q
    p = _params()
    t = jaxpass.transform(_model, [q, passes.Quantize(include=r"head")], params=p, example_args=(X,))
    assert isinstance(t.params["layers"]["w"], QArray) and isinstance(t.params["head"], QArray)
    assert [len(r.changed) for r in t.report] == [1, 1]
    assert _rel(t(X), _model(p, X)) < 2e-2


def test_shard_map_region_is_kept_and_weights_dequantized_at_its_boundary():
    from jax.sharding import Mesh, PartitionSpec as P

    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:  # pragma: no cover - older jax
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    p = {"w": jax.random.normal(jax.random.key(5), (16, 16)) / 4}

    def f(p, x):
        inner = shard_map(lambda w, x: jnp.tanh(x @ w), mesh=mesh, in_specs=(P(), P("data")),
                          out_specs=P("data"))
        return inner(p["w"], x)

    t0 = jaxpass.transform(f, [], params=p, example_args=(X,))
    chex.assert_trees_all_equal(jax.jit(t0.apply)(p, X), jax.jit(f)(p, X))
    t = jaxpass.transform(f, [passes.Quantize()], params=p, example_args=(X,))
    assert t.report[0].events_of("boundary") and t.graph.count("shard_map") == 1
    assert _rel(t(X), f(p, X)) < 2e-2


def test_method_applies_the_same_passes_to_another_method():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(16, 16, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.lin(x)

        def twice(self, x, bias):
            return self.lin(self.lin(x)) + bias

    net = Net()
    t = jaxpass.transform(net, [passes.Quantize()], example_args=(X,))
    tw = t.method("twice")
    y = jax.jit(tw.apply)(t.params, X, 1.0)
    assert _rel(y, net.twice(X, 1.0)) < 2e-2
    assert tw.graph.count("jaxpass.quantized_dot_general") == 1  # graph of the example method
    closed = jax.make_jaxpr(lambda p: tw.apply(p, X, 1.0))(t.params)
    assert "jaxpass.quantized_dot_general" in str(closed)
