"""Multi-device checks of ``passes.Shard``, run in a subprocess with 8 host CPU devices.

Why a subprocess: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initializes its backends, and the rest of the test suite imports JAX in the same pytest workers
with one device. ``python shard_worker.py CHECK [CHECK ...]`` runs the named checks and prints
one JSON object ``{check: result}``; the tests in ``test_shard_multidevice.py`` assert on it.
Each result carries the reference it was compared with, so a failing assertion says why.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import numpy as np  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxpass  # noqa: E402
from jaxpass import models, passes, sharding  # noqa: E402

MESHES = {"dp": {"data": 8}, "fsdp": {"fsdp": 8}, "tp": {"data": 2, "tensor": 4},
          "fsdp+tp": {"fsdp": 4, "tensor": 2}}


def _tiny(scan=True):
    return models.random_model(models.configs.tiny(scan_layers=scan, num_kv_heads=2), seed=0)


def _ids(b=8, s=16, vocab=97):
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (b, s)), jnp.int32)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _specs(t):
    return sharding.shardings_of(t.params)


def check_presets(axis_types="auto", scan=True):
    """Every preset on the tiny Llama: outputs vs the unsharded run, and params' shardings."""
    model, ids = _tiny(scan), _ids()
    ref = np.asarray(jax.jit(lambda i: model(i))(ids))
    out = {}
    for preset, axes in MESHES.items():
        mesh = sharding.make_mesh(axes, axis_types=axis_types)
        t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset=preset)], example_args=(ids,),
                              check_numerics=False)
        y = jax.jit(t.apply)(t.params, ids)
        n_dev = {k: len(v.sharding.device_set) for k, v in
                 ((jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_flatten_with_path(t.params)[0])}
        out[preset] = {"rel_err": _err(y, ref), "specs": _specs(t), "n_devices": n_dev,
                       "report_rows": len(t.report[0].changed), "n_params": len(n_dev)}
    return out


def check_explicit():
    return check_presets("explicit", scan=True)


def check_quantized(presets=("fsdp+tp",)):
    """int4 g16 + fsdp+tp (and tp): codes and scales sharded consistently; output equals the
    unsharded quantized model; save/load restores exactly, with the shardings."""
    model, ids = _tiny(scan=False), _ids()
    q = passes.Quantize(weights="int4", group_size=16)
    tq = jaxpass.transform(model, [q], example_args=(ids,), check_numerics=False)
    ref = np.asarray(jax.jit(tq.apply)(tq.params, ids))
    out = {}
    for preset in presets:
        mesh = sharding.make_mesh(MESHES[preset])
        t = jaxpass.transform(model, [q, passes.Shard(mesh=mesh, preset=preset)], example_args=(ids,),
                              check_numerics=False)
        y = np.asarray(jax.jit(t.apply)(t.params, ids))
        same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                   zip(jax.tree_util.tree_leaves(t.params), jax.tree_util.tree_leaves(tq.params)))
        rec = {"rel_err": _err(y, ref), "specs": _specs(t), "values_unchanged": same,
               "notes": t.report[1].notes}
        if preset == "fsdp+tp":
            with tempfile.TemporaryDirectory() as d:
                jaxpass.save(t, os.path.join(d, "ck"))
                t2 = jaxpass.load(os.path.join(d, "ck"), model)
                la, lb = jax.tree_util.tree_leaves(t.params), jax.tree_util.tree_leaves(t2.params)
                rec["load_exact"] = len(la) == len(lb) and all(
                    np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype for a, b in zip(la, lb))
                rec["load_same_shardings"] = all(a.sharding == b.sharding for a, b in zip(la, lb))
                rec["load_rel_err"] = _err(jax.jit(t2.apply)(t2.params, ids), y)
        out[preset] = rec
    return out


def check_lower_after_shard():
    """LowerToPallas after Shard: sharded weights stay on XLA (named in the report / error);
    replicated ones (dp) are lowered and match the unsharded quantized model."""
    model, ids = _tiny(scan=False), _ids()
    q = passes.Quantize(weights="int4", group_size=32)  # 16 stored columns: the kernel's minimum
    tq = jaxpass.transform(model, [q], example_args=(ids,), check_numerics=False)
    ref = np.asarray(jax.jit(tq.apply)(tq.params, ids))
    low = passes.LowerToPallas(backend="triton", interpret=True)
    out = {}
    mesh = sharding.make_mesh(MESHES["fsdp+tp"])
    try:
        jaxpass.transform(model, [q, passes.Shard(mesh=mesh, preset="fsdp+tp"), low],
                          example_args=(ids,), check_numerics=False)
        out["sharded_error"] = None
    except jaxpass.PassError as e:
        out["sharded_error"] = str(e)
    mesh = sharding.make_mesh(MESHES["dp"])
    t = jaxpass.transform(model, [q, passes.Shard(mesh=mesh, preset="dp"), low],
                          example_args=(ids,), check_numerics=False)
    out["dp_rel_err"] = _err(jax.jit(t.apply)(t.params, ids), ref)
    out["dp_lowered"] = len(t.report[-1].matched_ops)
    return out


def _all_gathers(hlo: str) -> list[tuple[int, ...]]:
    shapes = []
    for m in re.finditer(r"= \w+\[([\d,]*)\]\{[^}]*\} all-gather(?:-start)?\(", hlo):
        shapes.append(tuple(int(x) for x in m.group(1).split(",") if x))
    return shapes


def check_quantized_tp():
    return check_quantized(("tp",))


def check_hlo(presets=("fsdp",)):
    """Compiled HLO of the sharded forward: which shapes are all-gathered. For tp the kv heads
    (4) divide the tensor axis (4), so no weight needs to move."""
    model, ids = _tiny(scan=True), _ids()
    if "tp" in presets:
        model = models.random_model(models.configs.tiny(scan_layers=True, num_kv_heads=4), seed=0)
    out = {}
    for preset in presets:
        mesh = sharding.make_mesh(MESHES[preset])
        t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset=preset)], example_args=(ids,),
                              check_numerics=False)
        hlo = jax.jit(t.apply).lower(t.params, ids).compile().as_text()
        weights = {jax.tree_util.keystr(p): tuple(x.shape)
                   for p, x in jax.tree_util.tree_flatten_with_path(t.params)[0] if x.ndim >= 2}
        out[preset] = {"all_gathers": _all_gathers(hlo), "weights": weights}
    return out


def check_hlo_tp():
    return check_hlo(("tp",))


def check_decode():
    """Greedy KV-cached decoding under tp (cache sharded by kv heads) equals the unsharded run."""
    model = _tiny(scan=False)
    prompt = _ids(2, 6)
    ref = np.asarray(models.generate(model, prompt, max_new_tokens=6))
    mesh = sharding.make_mesh({"tensor": 2, "data": 4})
    t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset="tp")], example_args=(prompt,),
                          check_numerics=False)
    init = lambda b, n, dtype=None: sharding.shard_kv_cache(model.init_cache(b, n, dtype), mesh)
    got = np.asarray(models.generate(t, prompt, max_new_tokens=6, init_cache=init))
    cache = init(2, 12)
    return {"equal": bool(np.array_equal(got, ref)), "ref": ref.tolist(), "got": got.tolist(),
            "cache_spec": str(cache[0].k.sharding.spec)}


def check_compressed():
    """2:4 sparse weights (inference) and QAT fake-quantized masters (train mode) under fsdp+tp:
    outputs vs the same passes unsharded, and which leaves got sharded."""
    model = models.random_model(models.configs.tiny(num_layers=1), seed=0)
    ids = _ids(4, 8)
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    out = {}
    for name, pre, mode in (("sparse", passes.Sparsify(pattern="2:4", exclude=r"\['embed'\]"), "inference"),
                            ("qat", passes.Quantize(weights="int4", group_size=16, exclude=r"\['embed'\]"), "train")):
        base = jaxpass.transform(model, [pre], example_args=(ids,), mode=mode, check_numerics=False)
        t = jaxpass.transform(model, [pre, passes.Shard(mesh=mesh, preset="fsdp+tp")], example_args=(ids,),
                              mode=mode, check_numerics=False)
        rec = {"rel_err": _err(jax.jit(t.apply)(t.params, ids), base.apply(base.params, ids)),
               "specs": _specs(t)}
        if mode == "train":
            g = jax.grad(lambda p: t.apply(p, ids).sum())(t.params)
            rec["grad_specs"] = sharding.shardings_of(g)
        out[name] = rec
    return out


def check_zoo():
    """The core zoo under fsdp and tp (auto axes): outputs vs the unsharded run."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import zoo

    out = {}
    for case in zoo.CASES:
        for preset, axes in (("fsdp", {"fsdp": 2, "data": 4}), ("tp", {"tensor": 2, "data": 4})):
            zm = case.build()
            ref = zm.run()
            try:
                mesh = sharding.make_mesh(axes)
                t = jaxpass.transform(zm.model, [passes.Shard(mesh=mesh, preset=preset)],
                                      params=zm.params, example_args=zm.example_args, check_numerics=False)
                y = jax.jit(t.apply)(t.params, *zm.example_args)
                errs = [_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(y), jax.tree_util.tree_leaves(ref))]
                sharded = sum(1 for v in _specs(t).values() if v != "P()")
                out[f"{case.name}/{preset}"] = {"rel_err": max(errs), "sharded_leaves": sharded}
            except Exception as e:  # recorded, asserted by the test
                out[f"{case.name}/{preset}"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    return out


def check_smollm2():
    """SmolLM2-135M, every preset (auto axes), 4 x 32 tokens: logits vs the unsharded run."""
    model, _ = models.smollm2()
    ids = _ids(4, 32, vocab=49152)
    ref = np.asarray(jax.jit(lambda i: model(i))(ids))
    out = {}
    # 4 of the 8 devices: a replicated copy of the 540 MB of float32 params per device adds up.
    for preset, axes in (("dp", {"data": 4}), ("fsdp", {"fsdp": 4}), ("tp", {"tensor": 2, "data": 2}),
                         ("fsdp+tp", {"fsdp": 2, "tensor": 2})):
        mesh = sharding.make_mesh(axes, devices=jax.devices()[:4])
        t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset=preset)], example_args=(ids,),
                              check_numerics=False)
        y = jax.jit(t.apply)(t.params, ids)
        out[preset] = {"rel_err": _err(y, ref), "specs": _specs(t)}
    return out


if __name__ == "__main__":
    res = {}
    for name in sys.argv[1:]:
        res[name] = globals()["check_" + name]()
    print("RESULT " + json.dumps(res))
