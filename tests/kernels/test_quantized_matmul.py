"""Every quantized-matmul implementation against the f32 reference, on random inputs.

One base class holds the cases; each backend is a subclass that says how to run it (tokamax
style), so a new backend is one small class. Pallas kernels run in the interpreter on CPU
(``interpret=True``); the GPU itself is covered by scripts/gpu_kernel_check.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass.kernels_pallas.quantized_matmul import (
    TritonConfig, api, pallas_mosaic_tpu, pallas_triton, reference)
from qmm_cases import TOL, random_packed, rel_err

_reference = jax.jit(reference.quantized_matmul_reference)  # one compile per shape, not per op
_xla = jax.jit(functools.partial(api.quantized_matmul, backend="xla"))

C = TritonConfig
# (M, K, N, bits, group_size, symmetric, x dtype, Triton config). Ragged M, N and K against the
# blocks, int4 sym/asym, int8, groups 32/64/128 and per-channel, GEMV (block_m < 16) and dot
# variants, split-K, with and without the GEMV prefetch (num_stages 1 vs 2).
CASES = [
    (1, 256, 80, 4, 64, True, jnp.bfloat16, C(1, 32, 64, 1, 4, 2)),
    (3, 256, 72, 4, 32, False, jnp.bfloat16, C(4, 32, 64, 2, 4, 1)),
    (5, 192, 40, 8, None, True, jnp.bfloat16, C(8, 16, 128, 1, 4, 2)),
    (2, 256, 48, 4, 128, False, jnp.float32, C(2, 16, 64, 1, 4, 2)),
    (17, 256, 80, 4, 64, True, jnp.bfloat16, C(16, 32, 64, 1, 4, 2)),
    (7, 512, 64, 4, 128, False, jnp.bfloat16, C(16, 64, 128, 2, 4, 2)),
    (33, 320, 48, 4, None, True, jnp.bfloat16, C(64, 16, 64, 1, 4, 2)),
    (9, 256, 100, 8, 64, False, jnp.bfloat16, C(16, 32, 64, 1, 4, 2)),
    (4, 128, 32, 8, None, True, jnp.float32, C(16, 16, 32, 2, 4, 2)),
    (6, 256, 64, 4, 32, True, jnp.float16, C(16, 32, 64, 1, 4, 2)),
]
IDS = [f"M{c[0]}-K{c[1]}-N{c[2]}-int{c[3]}-g{c[4]}-{'sym' if c[5] else 'asym'}-"
       f"{jnp.dtype(c[6]).name}-{c[7].short()}" for c in CASES]


class QuantizedMatmulTestBase:
    """Subclasses define ``run(x, pw, cfg)``; ``supports(case)`` may skip unsupported cases."""

    def run(self, x, pw, cfg):
        raise NotImplementedError

    def supports(self, bits, dtype):
        return True

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_matches_reference(self, case):
        m, k, n, bits, gs, sym, dtype, cfg = case
        if not self.supports(bits, dtype):
            pytest.skip("not supported by this backend")
        rng = np.random.default_rng(hash(case[:6]) % 2 ** 32)
        pw = random_packed(rng, k, n, bits, gs, sym)
        x = jnp.asarray(rng.standard_normal((m, k)), dtype)
        y = self.run(x, pw, cfg)
        assert y.shape == (m, n) and y.dtype == dtype
        assert rel_err(y, _reference(x, pw)) <= TOL[jnp.dtype(dtype)]

    def test_bf16_scales_int_zeros_and_batch_dims(self):
        rng = np.random.default_rng(7)
        pw = random_packed(rng, 256, 48, 4, 64, False, scale_dtype=jnp.bfloat16,
                           zero_dtype=jnp.int8)
        x = jnp.asarray(rng.standard_normal((2, 3, 256)), jnp.bfloat16)
        y = self.run(x, pw, C(4, 16, 64, 1, 4, 2))
        assert y.shape == (2, 3, 48)
        assert rel_err(y, _reference(x, pw)) <= 1e-2


class TestXla(QuantizedMatmulTestBase):
    def run(self, x, pw, cfg):
        return _xla(x, pw)


class TestTritonInterpret(QuantizedMatmulTestBase):
    def run(self, x, pw, cfg):
        return pallas_triton.quantized_matmul_triton(x, pw, config=cfg, interpret=True)


class TestMosaicTpuInterpret(QuantizedMatmulTestBase):
    def supports(self, bits, dtype):
        return dtype == jnp.bfloat16  # keeps CPU time down; f16 / f32 paths are the same code

    def run(self, x, pw, cfg):
        small = (("block_k", 64), ("block_m", 8), ("block_n", 32))
        return pallas_mosaic_tpu.quantized_matmul_tpu(x, pw, config=small, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("m,cfg", [(1, C(1, 64, 256, 4, 4, 3)), (16, C(16, 64, 128, 2, 4, 3))])
def test_triton_interpret_llama_like_shape(m, cfg):
    rng = np.random.default_rng(m)
    pw = random_packed(rng, 4096, 256, 4, 128, True, scale_dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, 4096)), jnp.bfloat16)
    y = pallas_triton.quantized_matmul_triton(x, pw, config=cfg, interpret=True)
    assert rel_err(y, reference.quantized_matmul_reference(x, pw)) <= 1e-2


# ------------------------------------------------------------------------------ dispatch


def _pw(k=256, n=64, bits=4, gs=64):
    return random_packed(np.random.default_rng(0), k, n, bits, gs, True)


def test_auto_on_cpu_is_xla_with_a_reason():
    sel = api.select_implementation((4, 256), jnp.bfloat16, _pw(), platform="cpu")
    assert sel.backend == "xla" and "cpu" in sel.reason


def test_auto_on_gpu_decode_picks_triton_and_prefill_xla_without_tuning():
    pw = _pw()
    dec = api.select_implementation((4, 256), jnp.bfloat16, pw, platform="gpu")
    assert dec.backend == "triton" and isinstance(dec.config, TritonConfig)
    pre = api.select_implementation((4096, 256), jnp.bfloat16, pw, platform="gpu")
    assert pre.backend == "xla" and "M=4096" in pre.reason


def test_auto_falls_back_when_the_kernel_does_not_apply():
    pw = random_packed(np.random.default_rng(0), 48, 32, 4, 16, True)  # 8 columns per group
    sel = api.select_implementation((4, 48), jnp.bfloat16, pw, platform="gpu")
    assert sel.backend == "xla" and "group_size=16" in sel.reason
    with pytest.raises(ValueError, match="triton"):
        api.select_implementation((1, 48), jnp.bfloat16, pw, backend="triton")
    # one row: the word GEMV reads whole 8-value words, which a group of 16 holds exactly
    assert api.select_implementation((1, 48), jnp.bfloat16, pw, platform="gpu").backend == "triton_gemv"


def test_quantized_matmul_under_jit_and_with_interpret():
    pw = _pw()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 256)), jnp.bfloat16)
    ref = reference.quantized_matmul_reference(x, pw)
    y = jax.jit(lambda a, w: api.quantized_matmul(a, w))(x, pw)
    assert rel_err(y, ref) <= 1e-2
    y = api.quantized_matmul(x, pw, backend="triton", interpret=True)
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("bad,match", [
    (dict(x=np.zeros((2, 100), np.float32)), "x"),
    (dict(x=np.zeros((2, 256), np.int32)), "x"),
    (dict(w="not packed"), "w"),
    (dict(backend="cuda"), "backend"),
])
def test_quantized_matmul_bad_arguments(bad, match):
    x = jnp.asarray(bad.get("x", np.ones((2, 256), np.float32)))
    with pytest.raises(ValueError, match=match):
        api.quantized_matmul(x, bad.get("w", _pw()), backend=bad.get("backend", "auto"))


def test_tuning_cache_on_disk_overrides_the_shipped_table(tmp_path, monkeypatch):
    """A tuning run records into this machine's cache (``$JAXPASS_TUNING_DIR``), never the
    package; its entries win over the shipped table's, and the shipped ones still apply."""
    from jaxpass.kernels_pallas.quantized_matmul import tuning
    monkeypatch.setenv("JAXPASS_TUNING_DIR", str(tmp_path))
    tuning._table.cache_clear()
    try:
        _check_tuning_cache(tuning, tmp_path)
    finally:                      # later tests must not see this test's table
        monkeypatch.delenv("JAXPASS_TUNING_DIR")
        tuning._table.cache_clear()


def _check_tuning_cache(tuning, tmp_path):
    shipped = tuning.read_entries(tuning.TUNED_PATH)
    some_key = sorted(shipped)[0]
    pw = random_packed(np.random.default_rng(1), 256, 96, 4, 32, True)
    m = 3
    assert tuning.lookup(pw.format, jnp.bfloat16, m, pw.k, pw.n) is None
    assert api.select_implementation((m, 256), jnp.bfloat16, pw, platform="gpu").reason == \
        "default config"
    cfg = api.TritonConfig(block_m=16, block_n=32, block_k=64, split_k=2, num_warps=4,
                           num_stages=2)
    path = tuning.record({tuning.key(pw.format, jnp.bfloat16, m, pw.k, pw.n):
                          dict(backend="triton", config=cfg.to_dict(), device="test")}, "test")
    assert path == str(tmp_path / "quantized_matmul.json") and (tmp_path / "quantized_matmul.json").exists()
    sel = api.select_implementation((m, 256), jnp.bfloat16, pw, platform="gpu")
    assert sel.backend == "triton" and sel.config == cfg and sel.reason.startswith("tuned")
    fmt, dt, mb, k, n = some_key.split("|")
    assert tuning.lookup(fmt, dt, int(mb[1:]), int(k[1:]), int(n[1:])) == shipped[some_key]
    # a user entry for a shipped key replaces it
    tuning.record({some_key: dict(backend="xla", config=None, device="test")}, "test")
    assert tuning.lookup(fmt, dt, int(mb[1:]), int(k[1:]), int(n[1:]))["backend"] == "xla"
