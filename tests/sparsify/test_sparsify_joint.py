"""Joint SparseGPT + quantization (``Sparsify(method="sparsegpt", quantize=...)``): the sweep against
a numpy re-implementation, accuracy against prune-then-round, layout, composition and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxpass
from jaxpass import passes
from jaxpass.core.pass_api import PassError
from jaxpass.passes.quantize import QArray
from jaxpass.passes.quantize.qarray import quantize
from jaxpass.passes.sparsify import SparseArray
from jaxpass.passes.sparsify.sparsegpt import sparsegpt_quantize

D, H = 64, 96
MIX = ((jax.random.normal(jax.random.key(42), (D, D)) + jnp.eye(D))
       * jax.random.permutation(jax.random.key(7), jnp.geomspace(4.0, 0.05, D))[None, :])


def _data(n, key=3, rows=16):
    # Correlated inputs with channel scales spanning 80x: where error compensation pays off.
    return [(jax.random.normal(k, (rows, D)) @ MIX,) for k in jax.random.split(jax.random.key(key), n)]


def _hessian(k, key=5):
    x = np.asarray(jax.random.normal(jax.random.key(key), (4 * k, k))) * np.geomspace(3.0, 0.1, k)
    return (x.T @ x / x.shape[0]).astype(np.float32)


def _reference(w, h, *, n, m, block, sparsity, qmax, group, damp):
    """The paper's joint sweep, one row at a time in float64 (no lazy block updates)."""
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    k, r = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    step, g = (m or block), (group or k)
    mask, codes = np.zeros((k, r), bool), np.zeros((k, r))
    amax = np.abs(w).max(0)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    scales = []
    for i in range(k):
        if i % step == 0:
            score = w[i:i + step] ** 2 / np.diag(u)[i:i + step, None] ** 2
            if m:
                order = np.argsort(-score, axis=0, kind="stable")[:n]
                np.put_along_axis(mask[i:i + step], order, True, axis=0)
            else:
                flat = np.zeros(score.size, bool)
                n_keep = score.size - round(sparsity * score.size)
                flat[np.argsort(-score.reshape(-1), kind="stable")[:n_keep]] = True
                mask[i:i + step] = flat.reshape(score.shape)
        if group and i % g == 0:
            amax = np.abs(w[i:i + g]).max(0)
            scale = np.where(amax > 0, amax / qmax, 1.0)
            scales.append(scale)
        c = np.where(mask[i], np.clip(np.round(w[i] / scale), -qmax, qmax), 0.0)
        err = (w[i] - c * scale) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
        codes[i] = c
    return codes, np.stack(scales) if group else scale[None]


@pytest.mark.parametrize("pattern,qmax,group", [("2:4", 7, 16), ("unstructured", 7, 32), ("2:4", 127, None)])
def test_joint_sweep_equals_a_row_by_row_numpy_reference(pattern, qmax, group):
    k, r = 256, 24   # two lazy-update blocks of 128 rows: the blocked form is exercised
    w = np.asarray(jax.random.normal(jax.random.key(1), (k, r)))
    h = _hessian(k)
    n, m = (2, 4) if pattern == "2:4" else (None, None)
    codes, scale = sparsegpt_quantize(jnp.asarray(w), jnp.asarray(h), sparsity=0.5, n=n, m=m,
                                      block=16, qmax=qmax, group=group)
    want_c, want_s = _reference(w, h, n=n, m=m, block=16, sparsity=0.5, qmax=qmax, group=group, damp=0.01)
    np.testing.assert_allclose(np.asarray(scale), want_s, rtol=1e-4)
    # float32 blocked sums vs float64 row sums: a code may flip where a value sits on a rounding
    # boundary; none does on this data, and the dequantized weights agree to float tolerance.
    np.testing.assert_array_equal(np.asarray(codes), want_c)
    got = np.asarray(codes) * np.repeat(np.asarray(scale), k // scale.shape[0], axis=0)
    want = want_c * np.repeat(want_s, k // want_s.shape[0], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_without_error_feedback_joint_is_prune_then_round_with_quantizes_layout():
    # H = I, no damping: U is diagonal, so nothing moves between rows; 2:4 keeps the largest
    # |w| of each 4, so each group's absmax (and scale) is the pruned weight's: joint must give
    # exactly Quantize's round-to-nearest codes and scales of the magnitude-pruned weight.
    w = jax.random.normal(jax.random.key(2), (64, 16))
    codes, scale = sparsegpt_quantize(w, jnp.eye(64), sparsity=0.5, n=2, m=4, block=16, qmax=7,
                                      group=32, damp=0.0)
    groups = np.abs(np.asarray(w)).reshape(16, 4, 16)          # 4-row groups along K
    keep = np.argsort(np.argsort(-groups, axis=1, kind="stable"), axis=1, kind="stable") < 2
    pruned = np.where(keep.reshape(64, 16), np.asarray(w), 0.0)
    rtn = quantize(jnp.asarray(pruned), (0,), fmt="int4", group_size=32)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(rtn.codes()))
    np.testing.assert_array_equal(np.asarray(scale), np.asarray(rtn.scale))


def _layer_err(t, f, w_ref, held_out):
    num = sum(float(jnp.sum((t(x) - f(w_ref, x)) ** 2)) for (x,) in held_out)
    return num / sum(float(jnp.sum(f(w_ref, x) ** 2)) for (x,) in held_out)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_joint_beats_sparsegpt_then_round_to_nearest_on_held_out_outputs(pattern):
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8}
    f = lambda p, x: x @ p["w"]
    calib, held_out = _data(16), _data(8, key=9)
    kw = dict(params=params, example_args=calib[0], calibration_data=calib)
    joint = jaxpass.transform(f, [passes.Sparsify(pattern=pattern, method="sparsegpt", quantize="int4",
                                                  group_size=32)], **kw)
    seq = jaxpass.transform(f, [passes.Sparsify(pattern=pattern, method="sparsegpt"),
                                passes.Quantize(weights="int4", group_size=32)], **kw)
    prune_only = jaxpass.transform(f, [passes.Sparsify(pattern=pattern, method="sparsegpt")], **kw)
    err = {n: _layer_err(t, f, params, held_out) for n, t in
           (("joint", joint), ("sequential", seq), ("prune only", prune_only))}
    # Measured (joint / sequential / prune only): unstructured 0.0111 / 0.0127 / 0.0032, 2:4
    # 0.0200 / 0.0220 / 0.0130 (ratios 0.87, 0.91). On this data dense GPTQ int4 g32 has 0.74x
    # RTN's error; joint removes a share of what rounding adds to the pruned weight.
    assert err["joint"] < 0.95 * err["sequential"], err
    assert err["prune only"] < err["joint"], err


def test_zeros_stay_zero_pattern_holds_and_program_computes_with_the_dequantized_weight():
    weights, group = "int4", 16
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8,
              "v": jax.random.normal(jax.random.key(1), (D, H)) / 8}      # used as h @ v.T
    f = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"].T
    calib = _data(8)
    t = jaxpass.transform(f, [passes.Sparsify(pattern="2:4", method="sparsegpt", quantize=weights,
                                              group_size=group)],
                          params=params, example_args=calib[0], calibration_data=calib)
    for p, k_axis in (("w", 0), ("v", 1)):
        sp = t.params[p]
        assert isinstance(sp, SparseArray) and isinstance(sp.value, QArray)
        q = sp.value
        assert (q.fmt, q.symmetric, q.packed_axis is not None) == (weights, True, weights == "int4")
        k = params[p].shape[k_axis]
        assert q.scale.shape[k_axis] == (1 if group is None else k // group)
        codes = np.moveaxis(np.asarray(q.codes()), k_axis, -1)
        assert np.all((codes != 0).reshape(codes.shape[0], -1, 4).sum(-1) <= 2)   # 2:4 along K
        dense = np.asarray(sp.materialize())
        np.testing.assert_array_equal(dense == 0, np.asarray(q.codes()) == 0)     # zeros are exact
        assert 0.5 <= (dense == 0).mean() < 0.53
    assert "quantized_dot_general" in str(t.graph)
    x = _data(1, key=11)[0][0]
    dense = {p: t.params[p].materialize() for p in ("w", "v")}
    np.testing.assert_allclose(t(x), f(dense, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(t.apply)(t.params, x), f(dense, x), rtol=1e-5, atol=1e-5)


def test_scan_stacked_weights_get_per_layer_hessians_and_per_channel_int8_scales():
    scales = jnp.array([1., 4., 16.])[:, None, None]
    params = {"w": jax.random.normal(jax.random.key(0), (3, D, D)) / 8 * scales}
    f = lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]
    calib = _data(8)
    t = jaxpass.transform(f, [passes.Sparsify(pattern="2:4", method="sparsegpt", quantize="int8")],
                          params=params, example_args=calib[0], calibration_data=calib)
    q = t.params["w"].value
    assert (q.fmt, q.qvalue.dtype, q.scale.shape) == ("int8", jnp.int8, (3, 1, D))
    dense = np.asarray(t.params["w"].materialize())
    for l in range(3):   # each layer keeps its own range
        assert 0.5 <= (dense[l] == 0).mean() < 0.53
        assert np.abs(dense[l]).max() == pytest.approx(float(np.abs(params["w"][l]).max()), rel=0.5)
    x = calib[1][0]
    np.testing.assert_allclose(t(x), f({"w": jnp.asarray(dense)}, x), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_and_later_quantize_is_refused(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(0), (D, H)) / 8}
    f = lambda p, x: x @ p["w"]
    calib = _data(4)
    joint = passes.Sparsify(pattern="2:4", method="sparsegpt", quantize="int4", group_size=32)
    t = jaxpass.transform(f, [joint], params=params, example_args=calib[0], calibration_data=calib)
    jaxpass.save(t, str(tmp_path / "ck"))
    t2 = jaxpass.load(str(tmp_path / "ck"), f, params=params)
    np.testing.assert_array_equal(np.asarray(t2.params["w"].value.qvalue),
                                  np.asarray(t.params["w"].value.qvalue))
    np.testing.assert_array_equal(np.asarray(t2(calib[1][0])), np.asarray(t(calib[1][0])))
    with pytest.raises(PassError, match=r"already rewritten by \['Sparsify'\]"):
        jaxpass.transform(f, [joint, passes.Quantize(weights="int8")], params=params,
                          example_args=calib[0], calibration_data=calib)


def test_lower_to_pallas_treats_the_joint_weight_as_the_sequential_one():
    params = {"w": jax.random.normal(jax.random.key(0), (256, 128)) / 8}
    f = lambda p, x: x @ p["w"]
    calib = [(jax.random.normal(k, (8, 256)),) for k in jax.random.split(jax.random.key(2), 4)]
    kw = dict(params=params, example_args=calib[0], calibration_data=calib)
    joint = [passes.Sparsify(pattern="2:4", method="sparsegpt", quantize="int4", group_size=64)]
    seq = [passes.Sparsify(pattern="2:4", method="sparsegpt"), passes.Quantize(weights="int4", group_size=64)]
    unlowered = jaxpass.transform(f, joint, **kw)
    lowered = jaxpass.transform(f, joint + [passes.LowerToPallas()], **kw)
    lowered_seq = jaxpass.transform(f, seq + [passes.LowerToPallas()], **kw)
    assert type(lowered.params["w"]) is type(lowered_seq.params["w"])
    x = calib[1][0]
    np.testing.assert_allclose(lowered(x), unlowered(x), rtol=1e-5, atol=1e-5)


def test_bad_joint_configurations_are_refused_with_the_reason():
    with pytest.raises(PassError, match="method='sparsegpt'"):
        passes.Sparsify(pattern="2:4", method="wanda", quantize="int4")
    with pytest.raises(PassError, match="stay exactly zero"):
        passes.Sparsify(pattern="2:4", method="sparsegpt", quantize="int4", symmetric=False)
    with pytest.raises(PassError, match=r"quantize='nf4'.*symmetric integer"):
        passes.Sparsify(method="sparsegpt", quantize="nf4")
    with pytest.raises(PassError, match="set quantize="):
        passes.Sparsify(method="sparsegpt", group_size=64)
    with pytest.raises(PassError, match="group_size=0"):
        passes.Sparsify(method="sparsegpt", quantize="int4", group_size=0)
    params = {"w": jnp.ones((48, 8))}
    f = lambda p, x: x @ p["w"]
    x = jnp.ones((2, 48))
    with pytest.raises(PassError, match=r"\['w'\].*contracting dimension 48.*not divisible by 32"):
        jaxpass.transform(f, [passes.Sparsify(method="sparsegpt", quantize="int4", group_size=32)],
                          params=params, example_args=(x,), calibration_data=[(x,)])
    with pytest.raises(PassError, match="one-shot"):
        jaxpass.transform(f, [passes.Sparsify(method="sparsegpt", quantize="int4")], params=params,
                          example_args=(x,), calibration_data=[(x,)], mode="train")
