"""Sanity checks of the test zoo and the program grammar themselves.

Why: the core's identity and quantization tests are only as good as their inputs. If a zoo case
silently produced NaNs, had a weight that does not influence the loss, listed a path that is not
a leaf, or no longer contained the scan / cond / custom_vjp it was written to exercise (say a JAX
upgrade inlined it), those tests would pass for the wrong reason. These tests pin the contract
documented in ``zoo.py`` and ``program_grammar.py``, independently of jaxpass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import event, given, settings

import program_grammar
import zoo

CASE_IDS = [c.name for c in zoo.CASES]


def _all_finite(tree) -> bool:
    # NumPy on the host: eager jnp ops would compile once per new leaf shape.
    return all(np.all(np.isfinite(np.asarray(x, np.float32)))
               for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def test_registry_covers_every_kind_and_lookup_works():
    """Every model family the core supports is represented, and ``get`` finds each case."""
    assert {c.kind for c in zoo.CASES} == set(zoo.KINDS)
    for case in zoo.CASES:
        assert zoo.get(case.name) is case
    with pytest.raises(KeyError, match="known"):
        zoo.get("no_such_case")


# ---------------------------------------------------------------------------------------------
# Each zoo case
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_paths_classify_every_matrix_leaf(case):
    """weight_paths / other_paths are real ndim >= 2 leaves and partition all such leaves.

    A path typo would make an ``include=`` rule in a core test match nothing; an unlisted
    matrix would let a pass quantize something the test never checks.
    """
    zm = case.build()
    assert zm.kind == case.kind
    assert (zm.params is None) == (zm.kind in ("nnx", "eqx"))
    leaves = zm.leaves()
    matrices = {p for p, x in leaves.items() if x.ndim >= 2}
    assert zm.weight_paths, "a case needs at least one matmul weight"
    assert zm.weight_paths <= matrices, sorted(zm.weight_paths - matrices)
    assert zm.other_paths <= matrices, sorted(zm.other_paths - matrices)
    assert not zm.weight_paths & zm.other_paths
    assert zm.weight_paths | zm.other_paths == matrices, sorted(
        matrices - zm.weight_paths - zm.other_paths)
    assert all(leaves[p].dtype == np.float32 for p in zm.weight_paths)


@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_weight_paths_match_the_jaxpr(case):
    """The hand-written weight_paths are exactly the leaves that reach a dot_general.

    Checked against an independent dataflow pass over the traced program (``dot_fed_paths``),
    so a library upgrade that changes how a model uses its params is caught here, not as a
    confusing failure in a core test.
    """
    zm = case.build()
    assert zm.dot_fed_paths() == zm.weight_paths


@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_runs_jitted_deterministic_and_finite(case):
    """Outputs are finite, and two jitted runs are bit-identical (the identity test's premise)."""
    zm = case.build()
    out = zm.run_jit()
    assert jax.tree_util.tree_leaves(out), "no outputs"
    assert _all_finite(out)
    again = zm.run_jit()
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(float(zm.loss(out)))


@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_gradients_reach_every_weight(case):
    """d loss / d W is finite everywhere and non-zero for every weight in weight_paths.

    A zero gradient means the weight does not reach the loss, so neither bit-identical
    gradients nor a quantization error bound would say anything about it.
    """
    zm = case.build()
    grads = zm.grads()
    assert zm.weight_paths <= set(grads), sorted(zm.weight_paths - set(grads))
    assert _all_finite(grads)
    dead = [p for p in sorted(zm.weight_paths) if not np.any(np.asarray(grads[p]))]
    assert not dead, f"weights with an all-zero gradient: {dead}"


@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_jaxpr_has_the_intended_higher_order_primitives(case):
    """The case still contains the scan / remat / cond / while / jit / custom_* it targets."""
    zm = case.build()
    found = zoo.higher_order_primitives(zm.make_jaxpr())
    assert zm.primitives <= found, f"missing {sorted(zm.primitives - found)}; found {sorted(found)}"


@pytest.mark.parametrize("case", zoo.CASES, ids=CASE_IDS)
def test_int8_bound_is_met_by_per_tensor_rtn(case):
    """Per-tensor int8 round-to-nearest of every weight changes the output, within int8_rtol.

    Per-tensor is the coarsest int8 scheme (every per-channel or per-group scale is at most the
    per-tensor one), so the bound a core test applies to a real Quantize pass is achievable.
    The error must also be non-zero: otherwise the weights do not reach the output.
    """
    zm = case.build()
    leaves = zm.leaves()
    zq = zm.replace_leaves({p: zoo.fake_quant_int8(leaves[p]) for p in zm.weight_paths})
    err = zoo.relative_error(zq.run_jit(), zm.run_jit())
    assert 0.0 < err <= zm.int8_rtol, err


def test_nnx_batch_stats_update_while_outputs_stay_deterministic():
    """The NNX case really has mutable state: BatchStat changes on every call, outputs do not.

    (Batch statistics, not the running averages, normalize in training mode.)
    """
    from flax import nnx

    zm = zoo.get("nnx_mlp").build()
    module = zm.model
    stats0 = jax.tree_util.tree_leaves(nnx.state(module, nnx.BatchStat))
    step = nnx.jit(lambda m, x: m(x))
    y1 = step(module, *zm.example_args)
    stats1 = jax.tree_util.tree_leaves(nnx.state(module, nnx.BatchStat))
    y2 = step(module, *zm.example_args)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
    assert any(not np.array_equal(a, b) for a, b in zip(stats0, stats1))


def test_replace_leaves_does_not_mutate_the_original():
    """``replace_leaves`` returns a copy; the original module keeps its weights."""
    for name in ("nnx_mlp", "eqx_mlp", "layout_ops"):
        zm = zoo.get(name).build()
        path = sorted(zm.weight_paths)[0]
        before = np.asarray(zm.leaves()[path])
        zz = zm.replace_leaves({path: jnp.asarray(np.zeros_like(before))})
        assert not np.any(np.asarray(zz.leaves()[path]))
        np.testing.assert_array_equal(np.asarray(zm.leaves()[path]), before)


def test_relative_error_definition():
    """relative_error is ||a - b|| / ||b|| over all leaves, with b the reference."""
    b = {"u": jnp.array([3.0, 0.0]), "v": jnp.array([[4.0]])}
    a = {"u": jnp.array([3.0, 1.0]), "v": jnp.array([[4.0]])}
    assert program_grammar.relative_error(a, b) == pytest.approx(1.0 / 5.0)
    assert program_grammar.relative_error(b, b) == 0.0


# ---------------------------------------------------------------------------------------------
# Generated programs
# ---------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(program_grammar.programs())
def test_generated_programs_run_finite_and_order_one(prog):
    """Generated programs run under jit, deterministically, are finite and O(1), and list their
    weights correctly.

    O(1) outputs keep relative error bounds meaningful; per-tensor int8 RTN of the weights then
    stays well inside ``program_grammar.INT8_RTOL``.
    """
    assert prog.weight_paths
    keys = {f"[{k!r}]" for k in prog.params}
    assert prog.weight_paths | prog.other_paths <= keys
    assert not prog.weight_paths & prog.other_paths
    assert all(prog.params[k].ndim >= 2 for k in prog.params
               if f"[{k!r}]" in prog.weight_paths)
    assert zoo.dot_fed_paths(prog.fn, prog.params, prog.x) == prog.weight_paths

    for construct in ("scan(", "cond(", "jit:", "[transpose]", "[reshape]", "[astype]"):
        if construct in prog.source:
            event(f"has {construct}")  # shown by pytest --hypothesis-show-statistics

    run = jax.jit(prog.fn)
    y = run(prog.params, prog.x)
    assert _all_finite(y)
    np.testing.assert_array_equal(np.asarray(run(prog.params, prog.x)), np.asarray(y))
    rms = float(np.sqrt(np.mean(np.square(np.asarray(y)))))
    assert 1e-3 < rms < 1e3, rms

    q = {k: (zoo.fake_quant_int8(v) if f"[{k!r}]" in prog.weight_paths else v)
         for k, v in prog.params.items()}
    err = program_grammar.relative_error(run(q, prog.x), y)
    assert err <= program_grammar.INT8_RTOL, err
