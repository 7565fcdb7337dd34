"""Sharding rules, presets and bad input, on this process's single device (no subprocess).

The spec logic is pure (mesh axis sizes in, PartitionSpecs out), so divisibility, conflicts,
unknown axes and the QArray layout rules (packed int4 pairs, scale groups) are checked with
axis sizes alone; the multi-device behaviour is in ``test_shard_multidevice.py``.
"""

import pickle

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxpass
from jaxpass import models, passes, sharding
from jaxpass.core.pass_api import PassError
from jaxpass.passes.quantize.qarray import quantize
from jaxpass.sharding.rules import LogicalRules, PathRules, check_axes, fit, leaf_specs, normalize

SIZES = {"data": 2, "fsdp": 4, "tensor": 2}


def test_fit_refuses_non_dividing_axis_under_rules_and_drops_it_for_presets():
    with pytest.raises(PassError, match=r"do not divide dimension 0 of size 6"):
        fit(("fsdp", None), (6, 8), SIZES, "rule 'w'", strict=True)
    notes = []
    assert fit(("fsdp", "tensor"), (6, 8), SIZES, "w", strict=False, notes=notes) == (None, "tensor")
    assert "replicated" in notes[0]


def test_unknown_and_repeated_mesh_axes_are_errors():
    with pytest.raises(PassError, match=r"mesh axis 'model' is not in the mesh"):
        check_axes(("model", None), SIZES, "rule")
    with pytest.raises(PassError, match="used twice"):
        check_axes(("fsdp", ("tensor", "fsdp")), SIZES, "rule")


def test_conflicting_path_rules_and_logical_rules():
    rules = PathRules.make([(r"kernel", (None, "tensor")), (r"q_proj", ("fsdp", None))])
    with pytest.raises(PassError, match="conflicting sharding rules for .*q_proj"):
        rules.lookup("['q_proj']['kernel']")
    same = PathRules.make([(r"kernel", (None, "tensor")), (r"q_proj", P(None, "tensor"))])
    assert normalize(same.lookup("['q_proj']['kernel']")[1]) == (None, "tensor")
    with pytest.raises(PassError, match="conflicting logical axis rules for 'embed'"):
        LogicalRules.make([("embed", "fsdp"), ("embed", "tensor")])
    with pytest.raises(PassError, match="mesh axis 'model' is not in the mesh"):
        LogicalRules.make([("mlp", "model")], SIZES)
    lr = LogicalRules.make([("embed", "fsdp"), ("mlp", "tensor"), ("batch", ("data", "fsdp"))])
    assert lr.resolve(("batch", None, "mlp"), "x") == (("data", "fsdp"), None, "tensor")
    with pytest.raises(PassError, match="'heads' is neither a mesh axis"):
        lr.resolve(("heads",), "x")


def P(*a):
    return jax.sharding.PartitionSpec(*a)


def test_qarray_int4_pairs_and_scale_groups_are_never_cut():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)), jnp.float32)
    q = quantize(w, (0,), fmt="int4", group_size=16)          # codes [32, 48] packed on axis 0, scale [4, 48]
    notes = []
    got = leaf_specs(q, ("fsdp", "tensor"), SIZES, "w", strict=True, notes=notes)
    assert got == {".qvalue": ("fsdp", "tensor"), ".scale": ("fsdp", "tensor")}
    # 8 shards along axis 0: 8 bytes each (pairs intact) but 4 groups cannot split 8 ways.
    with pytest.raises(PassError, match="4 groups along axis 0; 8 shards would cut a group"):
        leaf_specs(q, (("fsdp", "data"), None), SIZES, "w", strict=True, notes=[])
    got = leaf_specs(q, (("fsdp", "data"), None), SIZES, "w", strict=False, notes=notes)
    assert got[".qvalue"] == (None, None) and "cut a group" in notes[-1]
    # Per-channel scale (shared over axis 0) is replicated along it, sharded with the codes on axis 1.
    qc = quantize(w[:6], (0,), fmt="int4")                    # 6 rows: 3 bytes, cannot split in 2
    with pytest.raises(PassError, match="split a byte"):
        leaf_specs(qc, ("tensor", None), SIZES, "w", strict=True, notes=[])
    assert leaf_specs(qc, (None, "fsdp"), SIZES, "w", strict=True, notes=[]) == {
        ".qvalue": (None, "fsdp"), ".scale": (None, "fsdp")}


def test_presets_logical_axes():
    la = sharding.logical_axes
    use = {"contracting": {1}, "free": {2}, "sliced": {0}}
    assert la("['layers']['attn']['q_proj']['kernel']", (4, 32, 64), use) == ("layers", "embed", "mlp")
    assert la("['layers']['mlp']['down_proj']['kernel']", (4, 64, 32), use) == ("layers", "mlp", "embed")
    assert la("['embed']", (97, 32), None) == ("vocab", "embed")
    assert la("['norm']['weight']", (32,), None) == (None,)
    with pytest.raises(PassError, match=r"preset='tp'\) shards over mesh axes \('tensor',\)"):
        sharding.preset_rules("tp", {"fsdp": 4})
    with pytest.raises(PassError, match="presets are"):
        sharding.preset_rules("zero3", {"fsdp": 4})


def test_shard_on_one_device_mesh_pickles_and_rejects_bad_rules_before_compiling():
    mesh = sharding.make_mesh({"fsdp": 1, "tensor": 1})
    p = passes.Shard(mesh=mesh, preset="fsdp+tp")
    p2 = pickle.loads(pickle.dumps(p))
    assert p2.mesh == mesh and p2.preset == "fsdp+tp"
    with pytest.raises(PassError, match="preset='tp'"):
        passes.Shard(mesh=sharding.make_mesh({"fsdp": 1}), preset="tp")
    with pytest.raises(PassError, match="expected a jax.sharding.Mesh"):
        passes.Shard(mesh={"fsdp": 8}, preset="fsdp")
    model = models.random_model(models.configs.tiny(num_layers=1))
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(PassError, match=r"rule\(s\) \['nope'\] match no parameter"):
        jaxpass.transform(model, [passes.Shard(mesh=mesh, preset=None, rules=[("nope", ("fsdp",))])],
                          example_args=(ids,))
    with pytest.raises(PassError, match="'model' is neither a mesh axis"):
        passes.Shard(mesh=mesh, preset=None, rules=[("q_proj", (None, "model"))])
    with pytest.raises(PassError, match="used twice"):
        passes.Shard(mesh=mesh, preset="fsdp", rules=[("q_proj", ("fsdp", "fsdp"))])


def test_identity_on_one_device_and_report_lists_every_param():
    model = models.random_model(models.configs.tiny(num_layers=1))
    ids = jnp.asarray(np.arange(8).reshape(2, 4) % 97, jnp.int32)
    mesh = sharding.make_mesh({"fsdp": 1, "tensor": 1})
    t = jaxpass.transform(model, [passes.Shard(mesh=mesh, preset="fsdp+tp")], example_args=(ids,))
    np.testing.assert_allclose(np.asarray(t(ids)), np.asarray(model(ids)), rtol=1e-6, atol=1e-6)
    n_params = len(jax.tree_util.tree_leaves(nnx_params(model)))
    rep = t.report[0]
    assert len(rep.changed) == n_params
    assert all("P(" in c.after for c in rep.changed)
    assert rep.output_error is not None and rep.output_error < 1e-6


def nnx_params(model):
    from flax import nnx
    return nnx.state(model, nnx.Param)
