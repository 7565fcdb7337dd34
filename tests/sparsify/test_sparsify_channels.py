"""Structured channel pruning: ``Sparsify(pattern="channels")``.

The reference for every exactness check: removing channel ``j`` of a group is the same function
as zeroing row ``j`` of its consuming weights in the dense model (nothing else ever sees the
channel), so the pruned program must equal the dense program with those rows zeroed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpass
from jaxpass import passes
from jaxpass.core.pass_api import PassError
from jaxpass.passes.sparsify.structured_values import ChannelPruned, PrunedVector

TOL = dict(rtol=1e-5, atol=1e-5)


def _mlp_params(key=0, d=16, h=32):
    k = jax.random.split(jax.random.key(key), 3)
    return {"gate": jax.random.normal(k[0], (d, h)) / 4, "up": jax.random.normal(k[1], (d, h)) / 4,
            "down": jax.random.normal(k[2], (h, d)) / 6}


def _mlp(p, x):
    return (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"] + x


def _kept_rows(full, compact, axis=0):
    """Indices of ``full``'s slices along ``axis`` that ``compact`` kept (in order)."""
    full = np.moveaxis(np.asarray(full), axis, 0).reshape(np.shape(full)[axis], -1)
    compact = np.moveaxis(np.asarray(compact), axis, 0).reshape(np.shape(compact)[axis], -1)
    return np.array([int(np.flatnonzero((full == row).all(1))[0]) for row in compact])


def _zero_rows(w, kept, axis=0):
    mask = np.zeros(w.shape[axis], bool)
    mask[kept] = True
    shape = [1] * w.ndim
    shape[axis] = -1
    return jnp.where(mask.reshape(shape), w, 0)


def test_pruned_mlp_equals_dense_with_consumer_rows_zeroed_and_magnitude_picks_them():
    p = _mlp_params()
    before = jax.tree.map(np.array, p)
    x = jax.random.normal(jax.random.key(5), (4, 16))
    t = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.25)],
                          params=p, example_args=(x,))
    tp = t.params
    assert isinstance(tp["down"], ChannelPruned)
    assert tp["gate"].shape == (16, 24) and tp["up"].shape == (16, 24) and tp["down"].shape == (24, 16)
    kept = _kept_rows(p["down"], tp["down"].value)
    np.testing.assert_array_equal(_kept_rows(p["gate"], tp["gate"].value, 1), kept)
    np.testing.assert_array_equal(_kept_rows(p["up"], tp["up"].value, 1), kept)
    # magnitude: the group's squared L2 norm per channel, the top 24 kept
    score = (np.sum(np.asarray(p["gate"]) ** 2, 0) + np.sum(np.asarray(p["up"]) ** 2, 0)
             + np.sum(np.asarray(p["down"]) ** 2, 1))
    np.testing.assert_array_equal(kept, np.sort(np.argsort(-score)[:24]))
    ref = _mlp({**p, "down": _zero_rows(p["down"], kept)}, x)
    np.testing.assert_allclose(t(x), ref, **TOL)
    np.testing.assert_allclose(jax.jit(t.apply)(tp, x), ref, **TOL)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, p))  # untouched
    skipped = dict(t.report[0].skipped)
    assert "reach add" in skipped["['down']"]


class _BiasMLP(nnx.Module):
    """nnx.Linear layers with biases, a custom_jvp activation and a per-channel scale."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 8, rngs=rngs)
        self.l1.bias[...] = jax.random.normal(rngs.params(), (32,)) * 0.3
        self.s = nnx.Param(jnp.linspace(0.5, 1.5, 32))

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)) * self.s[...]) + x


def test_nnx_linear_biases_and_scales_are_pruned_with_their_channels():
    m = _BiasMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    t = jaxpass.transform(m, [passes.Sparsify(pattern="channels", sparsity=0.5)], example_args=(x,))
    tp = t.params
    assert isinstance(tp["l1"]["bias"], PrunedVector) and tp["l1"]["bias"].shape == (16,)
    assert isinstance(tp["s"], PrunedVector) and tp["s"].shape == (16,)
    assert tp["l2"]["bias"].shape == (8,)                       # the output channels stay
    kept = _kept_rows(m.l2.kernel[...], tp["l2"]["kernel"].value)
    ref_model = _BiasMLP(nnx.Rngs(0))
    ref_model.l2.kernel[...] = _zero_rows(ref_model.l2.kernel[...], kept)
    np.testing.assert_allclose(t(x), ref_model(x), **TOL)
    np.testing.assert_array_equal(tp["s"].value, np.asarray(m.s[...])[kept])


@pytest.mark.parametrize("scan", [True, False])
def test_tiny_llama_mlp_channels_per_layer(scan):
    from jaxpass import models
    from jaxpass.models import configs
    model = models.random_model(configs.tiny(scan_layers=scan), seed=0)
    ids = jnp.arange(16, dtype=jnp.int32)[None] % 50
    t0 = jaxpass.transform(model, [], example_args=(ids,))
    t = jaxpass.transform(model, [passes.Sparsify(pattern="channels", sparsity=0.25)], example_args=(ids,))
    ref_params, kept_per_layer = _zeroed_reference(t0, t, scan, "down_proj")
    assert all(len(k) == 48 for k in kept_per_layer)
    np.testing.assert_allclose(t(ids), t0.apply(ref_params, ids), **TOL)
    assert len(kept_per_layer) == 2 and not np.array_equal(*kept_per_layer)  # one choice per layer
    skipped = " ".join(w for _, w in t.report[0].skipped)
    assert "pattern='heads'" in skipped and "program output" in skipped


def _zeroed_reference(t0, t, scan, consumer):
    """The dense params with the consumer rows each layer of ``t`` dropped set to zero."""
    pruned = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(
        t.params, is_leaf=lambda v: isinstance(v, ChannelPruned))[0]}
    dense, treedef = jax.tree_util.tree_flatten_with_path(t0.params)
    ref, kept_per_layer = [], []
    for path, w in dense:
        key = jax.tree_util.keystr(path)
        if consumer in key:
            full = w if scan else w[None]
            comp = pruned[key].value if scan else pruned[key].value[None]
            kept = [_kept_rows(full[l], comp[l]) for l in range(full.shape[0])]
            kept_per_layer += kept
            w = jnp.stack([_zero_rows(full[l], kept[l]) for l in range(full.shape[0])])
            w = w if scan else w[0]
        ref.append(w)
    return jax.tree_util.tree_unflatten(treedef, ref), kept_per_layer


@pytest.mark.parametrize("scan", [True, False])
def test_heads_prune_whole_kv_groups_and_decode_through_the_cache(scan):
    """``pattern="heads"``: a KV head and the query heads that read it go together (q, k, v
    columns and o rows really shrink); the function equals the dense model with those query
    heads' o_proj rows zeroed, in the forward and through the KV-cached decode path."""
    from jaxpass import evaluate, models
    from jaxpass.models import configs
    model = models.random_model(configs.tiny(scan_layers=scan), seed=1)   # 4 q / 2 kv heads of 8
    ids = (jnp.arange(32, dtype=jnp.int32)[None] * 7) % 97
    t0 = jaxpass.transform(model, [], example_args=(ids,))
    t = jaxpass.transform(model, [passes.Sparsify(pattern="heads", sparsity=0.5)], example_args=(ids,))
    shapes = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(
        t.params, is_leaf=lambda v: isinstance(v, ChannelPruned))[0] if isinstance(v, ChannelPruned)}
    assert sorted(s[-2:] for s in shapes.values()) == sorted([(32, 16), (32, 8), (32, 8), (16, 32)]
                                                             * (1 if scan else 2))
    ref_params, kept = _zeroed_reference(t0, t, scan, "o_proj")
    # o_proj keeps whole 16-row blocks: the 2 query heads (of 8) that read one KV head
    assert all(len(k) == 16 and k[0] % 16 == 0 and np.array_equal(k, np.arange(k[0], k[0] + 16))
               for k in kept)
    np.testing.assert_allclose(t(ids), t0.apply(ref_params, ids), **TOL)
    # cached decoding (prefill chunks of 8, then the cache) equals the cache-free forward
    full = evaluate.perplexity(t, np.asarray(ids[0]), context_length=32)
    cached = evaluate.perplexity(t, np.asarray(ids[0]), context_length=32, cache_chunk=8)
    np.testing.assert_allclose(cached, full, rtol=1e-5)
    assert "MLP-like" in " ".join(w for _, w in t.report[0].skipped)


def _calib(key, n=4, d=16):
    ks = jax.random.split(jax.random.key(key), n)
    # channels of very different scale and a non-zero mean: what Wanda and FLAP exploit
    scale = jnp.exp(jnp.linspace(-2, 1.5, d))
    return [(jax.random.normal(k, (32, d)) * scale + 0.5,) for k in ks]


def test_wanda_scores_and_flap_compensation():
    p = _mlp_params(1)
    calib = _calib(2)
    x = calib[0][0]
    held = jnp.concatenate([c[0] for c in _calib(9)])
    errs = {}
    for name, cfg in {"magnitude": dict(), "wanda": dict(method="wanda"),
                      "wanda+flap": dict(method="wanda", compensate=True),
                      "flap": dict(method="flap")}.items():
        t = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.5, **cfg)],
                              params=p, example_args=(x,), calibration_data=calib)
        errs[name] = float(jnp.linalg.norm(t(held) - _mlp(p, held)) / jnp.linalg.norm(_mlp(p, held)))
        if name == "wanda+flap":
            down = t.params["down"]
            kept = _kept_rows(p["down"], down.value)
            h = jnp.concatenate([jax.nn.silu(c[0] @ p["gate"]) * (c[0] @ p["up"]) for c in calib])
            mean = np.array(jnp.mean(h, 0))
            mean[kept] = 0
            np.testing.assert_allclose(down.bias, mean @ np.asarray(p["down"]), rtol=1e-4, atol=1e-5)
            # the program adds exactly that bias to the zeroed-rows reference
            ref = _mlp({**p, "down": _zero_rows(p["down"], kept)}, held) + down.bias
            np.testing.assert_allclose(t(held), ref, rtol=1e-4, atol=1e-4)
    assert errs["wanda"] < errs["magnitude"], errs
    assert errs["wanda+flap"] < errs["wanda"], errs
    assert errs["flap"] < errs["magnitude"], errs
    # FLAP's fluctuation score: Var(h_j) * ||W_down[j]||^2, the top half kept
    t = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.5, method="flap")],
                          params=p, example_args=(x,), calibration_data=calib)
    h = jnp.concatenate([jax.nn.silu(c[0] @ p["gate"]) * (c[0] @ p["up"]) for c in calib])
    score = np.var(np.asarray(h), 0) * np.sum(np.asarray(p["down"]) ** 2, 1)
    np.testing.assert_array_equal(_kept_rows(p["down"], t.params["down"].value),
                                  np.sort(np.argsort(-score)[:16]))
    assert t.params["down"].bias is not None


def test_composes_with_quantize_and_is_differentiable():
    p = _mlp_params(3)
    x = jax.random.normal(jax.random.key(4), (4, 16))
    t = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.25),
                                 passes.Quantize(weights="int8")], params=p, example_args=(x,))
    changed = [c.path for c in t.report[1].changed]
    assert "['down'].value" in changed and "['gate'].value" in changed
    from jaxpass.passes.quantize import QArray
    assert all(isinstance(t.params[k].value, QArray) for k in ("gate", "up", "down"))
    deq = {k: t.params[k].value.materialize() for k in ("gate", "up", "down")}
    np.testing.assert_allclose(t(x), _mlp(deq, x), rtol=1e-4, atol=1e-4)
    t1 = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.25)], params=p,
                           example_args=(x,))
    g = jax.grad(lambda q: jnp.sum(t1.apply(q, x) ** 2))(t1.params)
    assert g["down"].value.shape == (24, 16) and float(jnp.abs(g["down"].value).sum()) > 0
    # the gradient of the compact program matches the dense program's on the kept weights
    kept = _kept_rows(p["down"], t1.params["down"].value)
    dense = {"gate": p["gate"][:, kept], "up": p["up"][:, kept], "down": p["down"][kept]}
    gd = jax.grad(lambda q: jnp.sum(_mlp(q, x) ** 2))(dense)
    np.testing.assert_allclose(g["gate"].value, gd["gate"], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    p = _mlp_params(6)
    x = jax.random.normal(jax.random.key(7), (4, 16))
    t = jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.5)], params=p,
                          example_args=(x,))
    jaxpass.save(t, str(tmp_path / "ck"))
    t2 = jaxpass.load(str(tmp_path / "ck"), _mlp, params=p)
    assert t2.params["down"].shape == (16, 16)
    np.testing.assert_array_equal(np.asarray(t2(x)), np.asarray(t(x)))


def test_errors_name_what_is_at_fault():
    p = _mlp_params()
    x = jnp.ones((4, 16))
    one = lambda q, x: x @ q["w"]
    with pytest.raises(PassError, match="no prunable channel group.*program output"):
        jaxpass.transform(one, [passes.Sparsify(pattern="channels")], params={"w": jnp.ones((16, 8))},
                          example_args=(x,))
    with pytest.raises(PassError, match="every one of the 32 channels.*whole"):
        jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", sparsity=0.99)], params=p,
                          example_args=(x,))
    with pytest.raises(PassError, match=r"no prunable channel group.*\['gate'\].*mul"):
        jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", exclude=r"up")], params=p,
                          example_args=(x,))
    with pytest.raises(PassError, match="one-shot"):
        jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels")], params=p, example_args=(x,),
                          mode="train")
    with pytest.raises(PassError, match="calibration_data"):
        jaxpass.transform(_mlp, [passes.Sparsify(pattern="channels", method="wanda")], params=p,
                          example_args=(x,))
    with pytest.raises(PassError, match="'magnitude', 'wanda'"):
        passes.Sparsify(pattern="channels", method="sparsegpt")
    with pytest.raises(PassError, match="pattern='channels'"):
        passes.Sparsify(method="flap")
    with pytest.raises(PassError, match="compensate"):
        passes.Sparsify(pattern="2:4", compensate=True)


# -- every zoo model (third-party styles: Linen, NNX, Equinox, scans, custom derivatives) ----------

@pytest.mark.parametrize("name", __import__("zoo").names())
def test_zoo_models_prune_or_explain(name):
    """Each zoo model either has channel groups, and then pruning 0% of them runs the whole
    compact machinery (probe, slicing, compact rules through its scans / jits / custom
    derivatives) and must give the dense output exactly, while 25% really shrinks the weights;
    or it has none, and the error says why."""
    import zoo
    zm = zoo.get(name).build()
    params = zm.params if zm.kind in ("fn", "linen") else None
    run = lambda s: jaxpass.transform(zm.model, [passes.Sparsify(pattern="channels", sparsity=s)],
                                      params=params, example_args=zm.example_args,
                                      check_numerics=False)
    try:
        t0 = run(0.0)
    except PassError as e:
        msg = str(e)
        assert "no prunable channel group" in msg and ("reach" in msg or "output" in msg), msg
        return
    np.testing.assert_allclose(jax.jit(t0.apply)(t0.params, *zm.example_args), zm.run_jit(),
                               rtol=1e-6, atol=1e-6)
    t = run(0.25)
    shrunk = [c for c in t.report[0].changed if c.bytes_after < c.bytes_before]
    assert shrunk
    assert np.all(np.isfinite(np.asarray(t(*zm.example_args))))
