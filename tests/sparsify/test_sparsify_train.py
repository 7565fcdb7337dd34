"""Sparse training: masked weights, straight-through gradients, optax mask updates, finalize."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.passes.sparsify import (MaskedWeight, SparseArray, cubic_schedule, sparse_optimizer,
                                     update_masks)

D, H = 32, 16


def _problem():
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 4}
    f = lambda p, x: x @ p["w"]
    target = jax.random.normal(jax.random.key(1), (D, H)) / 4
    xs = jax.random.normal(jax.random.key(2), (64, D))
    return params, f, xs, xs @ target


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_train_mode_matches_one_shot_and_gradients_follow_the_recipe(pattern):
    params, f, xs, _ = _problem()
    inf = jaxpass.transform(f, [passes.Sparsify(pattern=pattern)], params=params, example_args=(xs,))
    t = jaxpass.transform(f, [passes.Sparsify(pattern=pattern)], params=params, example_args=(xs,),
                          mode="train")
    mw = t.params["w"]
    assert isinstance(mw, MaskedWeight) and mw.straight_through == (pattern == "2:4")
    np.testing.assert_array_equal(np.asarray(mw.mask), np.asarray(inf.params["w"].value != 0))
    np.testing.assert_allclose(t.apply(t.params, xs), inf(xs), rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(t.apply(p, xs) ** 2))(t.params)["w"]
    assert np.all(np.asarray(g.mask) == 0)
    dense_grad = jax.grad(lambda w: jnp.sum(f({"w": w}, xs) ** 2))(mw.master())
    pruned = np.asarray(mw.mask) == 0
    if pattern == "2:4":   # straight-through: the dense gradient at the masked weight
        np.testing.assert_allclose(g.weight, dense_grad, rtol=1e-5)
    else:                  # masked gradient
        assert np.all(np.asarray(g.weight)[pruned] == 0)
        np.testing.assert_allclose(np.asarray(g.weight)[~pruned], np.asarray(dense_grad)[~pruned], rtol=1e-5)


def _train(t, xs, ys, opt, steps):
    loss = lambda p: jnp.mean((t.apply(p, xs) - ys) ** 2)
    params, state = t.params, opt.init(t.params)

    @jax.jit
    def step(params, state):
        l, g = jax.value_and_grad(loss)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, l

    for _ in range(steps):
        params, state, l = step(params, state)
    return params, float(loss(t.params)), float(loss(params))


def test_sr_ste_keeps_2_4_and_lowers_the_loss_and_finalize_keeps_the_mask():
    params, f, xs, ys = _problem()
    t = jaxpass.transform(f, [passes.Sparsify(pattern="2:4")], params=params, example_args=(xs,),
                          mode="train")
    trained, before, after = _train(t, xs, ys, sparse_optimizer(optax.adam(1e-2)), 60)
    assert after < 0.5 * before, (before, after)
    m = np.asarray(trained["w"].mask).reshape(D // 4, 4, H)
    assert np.all(m.sum(1) == 2)
    np.testing.assert_array_equal(m.reshape(D, H), np.asarray(update_masks(trained)["w"].mask))
    final = t.finalize(trained)
    sp = final.params["w"]
    assert isinstance(sp, SparseArray)
    np.testing.assert_array_equal(np.asarray(sp.value != 0), np.asarray(trained["w"].mask != 0))
    np.testing.assert_allclose(final(xs), t.apply(trained, xs), rtol=1e-5, atol=1e-6)


def test_gradual_magnitude_pruning_follows_the_cubic_schedule():
    sched = cubic_schedule(0.8, begin_step=0, end_step=40)
    assert float(sched(0)) == pytest.approx(0.0) and float(sched(40)) == pytest.approx(0.8)
    assert float(sched(20)) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    params, f, xs, ys = _problem()
    t = jaxpass.transform(f, [passes.Sparsify(sparsity=0.8)], params=params, example_args=(xs,),
                          mode="train")
    opt = sparse_optimizer(optax.adam(1e-2), schedule=sched, update_every=5)
    trained, before, after = _train(t, xs, ys, opt, 50)
    assert (np.asarray(trained["w"].mask) == 0).mean() == pytest.approx(0.8, abs=1 / (D * H))
    assert after < before
    with pytest.raises(ValueError, match="end_step"):
        cubic_schedule(0.5, 10, 10)
