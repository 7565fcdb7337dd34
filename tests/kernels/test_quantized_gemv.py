"""The word GEMV kernel (pallas_triton_gemv) against the f32 reference, in the interpreter."""

import numpy as np
import pytest
import jax.numpy as jnp

from jaxpass.kernels_pallas.quantized_matmul import api, reference, tuning
from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig
from jaxpass.kernels_pallas.quantized_matmul.pallas_triton_gemv import (
    as_words, check_config, quantized_matmul_gemv)
from qmm_cases import TOL, random_packed, rel_err

# (M, K, N, bits, group_size, symmetric, x dtype, config): aligned and ragged N, K that leaves a
# partial last step (masked), steps inside one group (contiguous scales) and spanning several
# groups (gathered scales), split-K on and off, prefetch on and off.
CASES = [
    (1, 512, 96, 4, 128, True, jnp.bfloat16, GemvConfig(32, 8, 2)),
    (3, 1024, 100, 4, 64, False, jnp.float16, GemvConfig(32, 32, 3)),
    (1, 256, 64, 8, None, True, jnp.bfloat16, GemvConfig(16, 16, 1, num_stages=1)),
    (2, 384, 40, 4, 32, True, jnp.bfloat16, GemvConfig(16, 16, 2)),
    (8, 512, 64, 8, 128, False, jnp.float16, GemvConfig(64, 8, 4)),
    (1, 768, 72, 4, None, False, jnp.bfloat16, GemvConfig(32, 64, 2, num_stages=1)),
]


@pytest.mark.parametrize("m,k,n,bits,gs,sym,dtype,cfg", CASES,
                         ids=[f"M{c[0]}K{c[1]}N{c[2]}b{c[3]}g{c[4]}{'s' if c[5] else 'a'}" for c in CASES])
def test_gemv_matches_reference(m, k, n, bits, gs, sym, dtype, cfg):
    rng = np.random.default_rng(k + n + m)
    pw = random_packed(rng, k, n, bits, gs, sym)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    ref = reference.quantized_matmul_reference(x, pw)
    y = quantized_matmul_gemv(x, pw, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[jnp.dtype(dtype)]
    # the uint32 view computed once beforehand gives the same result
    y2 = quantized_matmul_gemv(x, pw, config=cfg, interpret=True, words=as_words(pw))
    np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y, np.float32))


def test_gemv_words_are_the_packed_bytes_little_endian():
    pw = random_packed(np.random.default_rng(1), 64, 8, 4, 32, True)
    words = np.asarray(as_words(pw))
    data = np.asarray(pw.data)
    assert words.shape == (8, 8) and words.dtype == np.uint32
    np.testing.assert_array_equal(words, data.view("<u4"))


def test_gemv_refuses_what_it_cannot_run():
    pw = random_packed(np.random.default_rng(2), 256, 32, 4, 64, True)
    assert "at most 8" in check_config((9, 256), jnp.bfloat16, pw, GemvConfig())
    assert "16-bit" in check_config((1, 256), jnp.float32, pw, GemvConfig())
    assert "block_n" in check_config((1, 256), jnp.bfloat16, pw, GemvConfig(block_n=48))
    with pytest.raises(ValueError, match="at most 8"):
        quantized_matmul_gemv(jnp.ones((9, 256), jnp.bfloat16), pw, interpret=True)
    odd = random_packed(np.random.default_rng(3), 12, 8, 8, None, True)  # K=12: 3 words of int8
    assert check_config((1, 12), jnp.bfloat16, odd, GemvConfig()) is None
    odd4 = random_packed(np.random.default_rng(4), 20, 8, 4, None, True)  # K=20: not 8-aligned
    assert "multiple of the 8 values" in check_config((1, 20), jnp.bfloat16, odd4, GemvConfig())


def test_auto_dispatch_uses_gemv_for_one_row_of_16_bit_x():
    pw = random_packed(np.random.default_rng(5), 256, 64, 4, 64, True)
    sel = api.select_implementation((1, 256), jnp.bfloat16, pw, platform="gpu")
    assert sel.backend == "triton_gemv" and sel.config == tuning.default_gemv_config(64)
    # f32 activations: the byte kernel (the word GEMV reads 16-bit pairs)
    sel32 = api.select_implementation((1, 256), jnp.float32, pw, platform="gpu")
    assert sel32.backend == "triton"
    x = jnp.asarray(np.random.default_rng(6).standard_normal((1, 256)), jnp.bfloat16)
    y = api.quantized_matmul(x, pw, interpret=True)
    assert rel_err(y, reference.quantized_matmul_reference(x, pw)) <= 1e-2
