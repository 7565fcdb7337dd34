"""jaxpass.save / jaxpass.load: exact round trip of every format, recipe kept."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.passes.quantize import QArray


def _leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("q", [passes.Quantize(weights="int4", group_size=8, symmetric=False),
                               passes.Quantize(weights="fp8"), passes.Quantize(weights="nf4")])
def test_round_trip_is_exact_for_nnx_with_state(tmp_path, q):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            rngs = nnx.Rngs(0)
            self.l1 = nnx.Linear(16, 32, rngs=rngs)
            self.bn = nnx.BatchNorm(32, use_running_average=False, rngs=rngs)
            self.l2 = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    x = jax.random.normal(jax.random.key(1), (4, 16))
    t = jaxpass.transform(Net(), [q], example_args=(x,))
    t(x)  # updates batch statistics in t.state
    jaxpass.save(t, str(tmp_path / "ckpt"))
    meta = json.load(open(tmp_path / "ckpt" / "jaxpass.json"))
    assert meta["recipe"] == [repr(q)]
    abstract_net = nnx.eval_shape(Net)
    t2 = jaxpass.load(str(tmp_path / "ckpt"), abstract_net)
    assert isinstance(t2.params["l1"]["kernel"], QArray)
    for group in ("params", "state"):
        a, b = _leaves(getattr(t, group)), _leaves(getattr(t2, group))
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8) if a[k].dtype.itemsize == 1 else a[k],
                                          np.asarray(b[k]).view(np.uint8) if b[k].dtype.itemsize == 1 else b[k])
    np.testing.assert_array_equal(t2.apply(t2.params, x), t.apply(t.params, x))


def test_load_refuses_a_checkpoint_of_another_model(tmp_path):
    p = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    f = lambda p, x: x @ p["w"]
    t = jaxpass.transform(f, [passes.Quantize()], params=p, example_args=(jnp.ones((2, 16)),))
    jaxpass.save(t, str(tmp_path / "c"))
    with pytest.raises(FileExistsError):
        jaxpass.save(t, str(tmp_path / "c"))
    other = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
    with pytest.raises(Exception, match="w"):
        jaxpass.load(str(tmp_path / "c"), f, params=other)
