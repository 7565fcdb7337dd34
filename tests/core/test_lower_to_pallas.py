"""LowerToPallas finds the quantized matmuls Quantize inserted and runs them on the kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.passes.lower_to_pallas import PackedLinear
from jaxpass.passes.quantize import QArray

K, H, N = 64, 128, 32


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"up": jax.random.normal(k[0], (K, H)) / 8,       # flax layout [in, out]
            "down": jax.random.normal(k[1], (N, H)) / 11,    # torch layout [out, in]
            "emb": jax.random.normal(k[2], (10, N))}


def mlp(p, x):
    h = jax.nn.gelu(x @ p["up"])
    return h @ p["down"].T + p["emb"][1]


X = jax.random.normal(jax.random.key(1), (2, 3, K))


@pytest.mark.parametrize("q", [passes.Quantize(weights="int4", group_size=32),
                               passes.Quantize(weights="int4", group_size=32, symmetric=False),
                               passes.Quantize(weights="int8"),
                               passes.Quantize(weights="int8", symmetric=False)])
def test_kernels_in_interpret_mode_match_the_quantized_program(q):
    p = _params()
    tq = jaxpass.transform(mlp, [q], params=p, example_args=(X,))
    t = jaxpass.transform(mlp, [q, passes.LowerToPallas(backend="triton", interpret=True)],
                          params=p, example_args=(X,))
    assert isinstance(t.params["up"], PackedLinear) and isinstance(t.params["down"], PackedLinear)
    assert t.graph.count("pallas_call") == 2 and t.graph.count("jaxpass.quantized_dot_general") == 0
    rewrites = t.report[1].events_of("rewrite")
    assert len(rewrites) == 2 and all("triton" in e.detail for e in rewrites)
    y, yq = t(X), tq(X)
    rel = float(jnp.linalg.norm(y - yq) / jnp.linalg.norm(yq))
    assert rel < 1e-5, rel
    # Exact inverse of the packing: the old QArray leaves are rebuilt bit for bit.
    for name in ("up", "down"):
        a, b = t.params[name].to_qarray(), tq.params[name]
        for f in ("qvalue", "scale", "zero"):
            if getattr(b, f) is not None:
                np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_auto_on_cpu_stays_on_xla_and_says_why():
    p = _params()
    t = jaxpass.transform(mlp, [passes.Quantize(weights="int4", group_size=32), passes.LowerToPallas()],
                          params=p, example_args=(X,))
    (e, _) = t.report[1].events_of("rewrite")
    assert "xla" in e.detail and "platform" in e.detail
    tq = jaxpass.transform(mlp, [passes.Quantize(weights="int4", group_size=32)], params=p, example_args=(X,))
    np.testing.assert_allclose(t(X), tq(X), rtol=1e-4, atol=1e-5)
    # New shapes re-specialize through the recorded rules.
    x1 = X[:1, :1]
    np.testing.assert_allclose(t(x1), tq(x1), rtol=1e-4, atol=1e-5)


def test_what_cannot_be_lowered_is_reported():
    p = _params()

    def tied(p, x):
        return (x @ p["up"]) @ p["up"].T  # weight used twice, once as [K, H], once as [H, K]

    with pytest.raises(jaxpass.PassError, match=r"\['down'\]: format nf4 has no kernel.*"
                                                 r"\['up'\]: its matmuls contract different axes"):
        jaxpass.transform(lambda p, x: mlp(p, x) + tied(p, x)[..., :N], [
            passes.Quantize(weights="nf4", include="down", group_size=32),
            passes.Quantize(weights="int8", include="up"), passes.LowerToPallas()],
            params=p, example_args=(X,))
    t = jaxpass.transform(mlp, [passes.Quantize(weights="nf4", include="down", group_size=32),
                                passes.Quantize(weights="int8", include="up"), passes.LowerToPallas()],
                          params=p, example_args=(X,))
    assert "nf4" in dict(t.report[2].skipped)["['down']"]
    assert isinstance(t.params["up"], PackedLinear) and isinstance(t.params["down"], QArray)
    with pytest.raises(jaxpass.PassError, match="put a Quantize pass before it"):
        jaxpass.transform(mlp, [passes.LowerToPallas()], params=p, example_args=(X,))
