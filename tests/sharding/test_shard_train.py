"""``scripts/train.py``: multi-process ``jax.distributed`` on CPU, and exact resume.

The 2-process run is two OS processes on this machine (2 host CPU devices each, gloo
collectives), one mesh ``fsdp=2, tensor=2`` over all 4 devices. Its reference is the loss of
the same model on the same first batch computed in this process, unsharded.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(ROOT, "scripts", "train.py")
TINY = ["--model", "tiny", "--layers", "1", "--batch", "4", "--seq", "8", "--warmup", "0"]


def _train_module():
    spec = importlib.util.spec_from_file_location("jaxpass_train_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(devices: int):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference_loss():
    """Step-1 loss of the unsharded model on train.py's first batch (one device, this process)."""
    import jax.numpy as jnp
    import optax

    train = _train_module()
    ns = type("A", (), {"model": "tiny", "layers": 1, "dtype": "float32", "scan_layers": False,
                        "seed": 0, "batch": 4, "seq": 8})()
    model = train.build_model(ns)
    ids = jnp.asarray(train.batch_at(0, ns, model.config.vocab_size))
    logits = model(ids[:, :-1])
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean())


def test_two_processes_jax_distributed_cpu(tmp_path):
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = [sys.executable, SCRIPT, *TINY, "--preset", "fsdp+tp", "--mesh", "fsdp=2,tensor=2",
               "--steps", "2", "--coordinator", f"localhost:{port}", "--num-processes", "2",
               "--process-id", str(pid), "--cpu-collectives", "gloo",
               "--out", str(tmp_path / f"out{pid}.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(2), cwd=str(tmp_path)))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    rec = json.loads((tmp_path / "out0.json").read_text())
    assert rec["processes"] == 2 and rec["n_devices"] == 4 and rec["mesh"] == {"fsdp": 2, "tensor": 2}
    assert not (tmp_path / "out1.json").exists()            # only process 0 writes
    ref = _reference_loss()
    np.testing.assert_allclose(rec["losses"]["1"], ref, rtol=1e-5)
    assert rec["shardings"]["['layers'][0]['attn']['q_proj']['kernel']"] == "P('fsdp', 'tensor')"


def test_mismatched_process_counts_fail_clearly_in_every_process(tmp_path):
    port = _free_port()
    procs = []
    for pid, n in ((0, 2), (1, 3)):  # the two processes disagree on the count
        cmd = [sys.executable, SCRIPT, *TINY, "--steps", "1", "--coordinator", f"localhost:{port}",
               "--num-processes", str(n), "--process-id", str(pid), "--init-timeout", "30",
               "--cpu-collectives", "gloo", "--out", str(tmp_path / f"out{pid}.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=_env(2), cwd=str(tmp_path)))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0, out[-2000:]
        assert "process 1 was started with num_processes=3, process 0 with num_processes=2" in out, \
            out[-2000:]
        assert "RegisterTask" not in out  # caught before XLA's rendezvous


def test_bad_process_arguments_fail_before_compiling():
    train = _train_module()
    for argv, msg in ((["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1"],
                       r"--process-id 2 must be in \[0, 2\)"),
                      (["--num-processes", "2"], "give --coordinator, --num-processes and --process-id")):
        with pytest.raises(SystemExit, match=msg):
            train.main(TINY + argv)
    with pytest.raises(SystemExit, match="--mesh"):
        train.parse_mesh("fsdp:2")


@pytest.mark.slow
def test_slow_exact_resume_and_training_modes(tmp_path):
    base = [sys.executable, SCRIPT, *TINY, "--preset", "fsdp+tp", "--mesh", "fsdp=4,tensor=2",
            "--steps", "4", "--ckpt-every", "2"]

    def run(*extra, name):
        out = tmp_path / f"{name}.json"
        p = subprocess.run(base + list(extra) + ["--out", str(out)], capture_output=True, text=True,
                           env=_env(8), cwd=str(tmp_path), timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads(out.read_text())

    full = run("--ckpt-dir", str(tmp_path / "a"), name="full")
    run("--ckpt-dir", str(tmp_path / "b"), "--stop-after", "2", name="first")
    resumed = run("--ckpt-dir", str(tmp_path / "b"), "--resume", name="resumed")
    assert resumed["start_step"] == 2
    assert resumed["losses"] == {k: v for k, v in full["losses"].items() if int(k) > 2}  # bit-exact
    for mode in ("qat", "sparse"):
        rec = run("--mode", mode, "--qat-group-size", "16", name=mode)
        assert len(rec["losses"]) == 4 and all(np.isfinite(list(rec["losses"].values())))
