"""``passes.Shard`` on 8 host CPU devices (``shard_worker.py`` in a subprocess; see its docstring).

References: every sharded output is compared with the same model run unsharded (relative
max-abs error <= 1e-5: sharding reorders float sums, nothing else); shardings are compared with
the preset's documented layout; the HLO check reads the compiled program's all-gathers.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-5


def run_worker(*checks, timeout=900):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "shard_worker.py"), *checks],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def default_results():
    return run_worker("presets", "quantized", "hlo", "lower_after_shard")


EXPECTED = {  # the tiny scan-over-layers Llama: [L, in, out] kernels, [vocab, d] embedding
    "dp": {"['layers']['attn']['q_proj']['kernel']": "P()", "['embed']": "P()"},
    "fsdp": {"['layers']['attn']['q_proj']['kernel']": "P(None, 'fsdp')",
             "['layers']['mlp']['down_proj']['kernel']": "P(None, None, 'fsdp')",
             "['embed']": "P(None, 'fsdp')", "['layers']['input_norm']['weight']": "P()"},
    "tp": {"['layers']['attn']['q_proj']['kernel']": "P(None, None, 'tensor')",
           "['layers']['mlp']['up_proj']['kernel']": "P(None, None, 'tensor')",
           "['layers']['mlp']['down_proj']['kernel']": "P(None, 'tensor')",
           "['layers']['attn']['o_proj']['kernel']": "P(None, 'tensor')"},
    "fsdp+tp": {"['layers']['attn']['q_proj']['kernel']": "P(None, 'fsdp', 'tensor')",
                "['layers']['mlp']['down_proj']['kernel']": "P(None, 'tensor', 'fsdp')"},
}


@pytest.mark.parametrize("preset", ["dp", "fsdp", "tp", "fsdp+tp"])
def test_presets_match_unsharded_and_carry_their_layout(default_results, preset):
    r = default_results["presets"][preset]
    assert r["rel_err"] <= TOL, r["rel_err"]
    for path, spec in EXPECTED[preset].items():
        assert r["specs"][path] == spec, (path, r["specs"][path])
    assert set(r["n_devices"].values()) == {8}          # every param lives on the whole mesh
    assert r["report_rows"] == r["n_params"]            # the report lists every parameter


def test_int4_codes_and_scales_shard_together_and_save_load_exactly(default_results):
    r = default_results["quantized"]["fsdp+tp"]
    assert r["rel_err"] <= TOL and r["values_unchanged"]
    s = r["specs"]
    for layer in (0, 1):
        base = f"['layers'][{layer}]['attn']['o_proj']['kernel']"
        # o_proj [32, 32] int4 g16: codes [16, 32]; 2 groups along axis 0 take 'tensor' (2 shards).
        assert s[base + ".qvalue"] == s[base + ".scale"] == "P('tensor', 'fsdp')"
        base = f"['layers'][{layer}]['attn']['q_proj']['kernel']"
        # 2 groups along axis 0 cannot take 'fsdp' (4 shards): left unsharded, with a note.
        assert s[base + ".qvalue"] == s[base + ".scale"] == "P(None, 'tensor')"
    assert any("4 shards would cut a group" in n for n in r["notes"])
    assert r["load_exact"] and r["load_same_shardings"] and r["load_rel_err"] == 0.0


def test_lower_to_pallas_after_shard_keeps_sharded_weights_on_xla(default_results):
    r = default_results["lower_after_shard"]
    assert r["sharded_error"] and "sharded across devices" in r["sharded_error"]
    # f32 model: the kernels multiply in IEEE f32, so only the summation order differs
    assert r["dp_lowered"] > 0 and r["dp_rel_err"] <= TOL


def test_fsdp_gathers_one_layer_at_a_time(default_results):
    r = default_results["hlo"]["fsdp"]
    stacked = {tuple(v) for k, v in r["weights"].items() if k.startswith("['layers']") and len(v) == 3}
    gathered = {tuple(g) for g in r["all_gathers"]}
    assert stacked and not (stacked & gathered), gathered       # never the whole [L, ...] stack
    per_layer = {s[1:] for s in stacked}
    assert per_layer & gathered, gathered                       # but each layer's weight, in the loop


@pytest.mark.slow
def test_slow_explicit_axes_tp_hlo_decode_and_quantized_tp():
    r = run_worker("explicit", "hlo_tp", "decode", "quantized_tp", "compressed")
    for name, rec in r["compressed"].items():
        assert rec["rel_err"] <= TOL, (name, rec["rel_err"])
        q = [v for k, v in rec["specs"].items() if "['attn']['q_proj']" in k]
        assert "P('fsdp', 'tensor')" in q, (name, q)        # the weight leaf follows the preset
    qat = r["compressed"]["qat"]
    kernels = [k for k in qat["specs"] if k.endswith(".weight") and "kernel" in k]
    assert kernels and all(qat["grad_specs"][k] == qat["specs"][k] for k in kernels)  # grads stay sharded
    for preset, rec in r["explicit"].items():
        assert rec["rel_err"] <= TOL, (preset, rec["rel_err"])
        for path, spec in EXPECTED[preset].items():
            assert rec["specs"][path] == spec, (preset, path)
    tp = r["hlo_tp"]["tp"]
    weights = {tuple(v) for v in tp["weights"].values()} | {tuple(v[1:]) for v in tp["weights"].values()}
    assert not weights & {tuple(g) for g in tp["all_gathers"]}, tp["all_gathers"]
    assert r["decode"]["equal"], r["decode"]
    assert r["decode"]["cache_spec"] == "P(None, None, 'tensor')"  # batch 2 does not divide 'data' (4)
    assert r["quantized_tp"]["tp"]["rel_err"] <= TOL


@pytest.mark.slow
def test_slow_zoo_and_smollm2_presets():
    r = run_worker("zoo", "smollm2", timeout=2400)
    bad = {k: v for k, v in r["zoo"].items() if "error" in v or v["rel_err"] > TOL}
    assert not bad, bad
    assert sum(v["sharded_leaves"] for v in r["zoo"].values()) > 0
    for preset, rec in r["smollm2"].items():
        assert rec["rel_err"] <= TOL, (preset, rec["rel_err"])
