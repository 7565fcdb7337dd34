"""W8A8 int8_matmul: the Triton kernel (interpreted) and XLA against the exact reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas.quantized_matmul import api, reference
from jaxpass.kernels_pallas.quantized_matmul.config import Int8Config
from qmm_cases import rel_err


def _args(rng, m, k, n):
    xq = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    xs = jnp.asarray(rng.uniform(1e-3, 1e-2, (m, 1)), jnp.float32)
    ws = jnp.asarray(rng.uniform(1e-3, 1e-2, (1, n)), jnp.float32)
    return xq, xs, wq, ws


@pytest.mark.parametrize("backend", ["triton", "xla"])
@pytest.mark.parametrize("m,k,n,cfg", [(20, 200, 40, Int8Config(16, 32, 64, 4, 2)),
                                       (1, 128, 64, Int8Config(16, 64, 32, 4, 2)),
                                       (70, 96, 130, Int8Config(32, 64, 32, 4, 2))])
def test_int8_matmul_matches_reference(backend, m, k, n, cfg):
    args = _args(np.random.default_rng(m * k + n), m, k, n)
    ref = reference.int8_matmul_reference(*args, out_dtype=jnp.float32)
    y = api.int8_matmul(*args, out_dtype=jnp.float32, backend=backend, config=cfg,
                        interpret=backend == "triton")
    assert y.shape == (m, n) and rel_err(y, ref) <= 1e-6
    yb = api.int8_matmul(*args, backend=backend, config=cfg, interpret=backend == "triton")
    assert yb.dtype == jnp.bfloat16 and rel_err(yb, ref) <= 1e-2


@pytest.mark.parametrize("which,match", [("xq", "xq"), ("wq", "wq"), ("x_scale", "x_scale"),
                                         ("w_scale", "w_scale")])
def test_int8_matmul_bad_arguments(which, match):
    xq, xs, wq, ws = _args(np.random.default_rng(0), 4, 32, 8)
    bad = dict(xq=xq.astype(jnp.int32), wq=wq[:16], x_scale=xs[:2], w_scale=ws.T)
    args = dict(xq=xq, x_scale=xs, wq=wq, w_scale=ws)
    args[which] = bad[which]
    with pytest.raises(ValueError, match=match):
        api.int8_matmul(args["xq"], args["x_scale"], args["wq"], args["w_scale"], backend="xla")
