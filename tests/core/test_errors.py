"""Bad input gets an error that names the parameter, op or rule at fault."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpass
from jaxpass import passes
from jaxpass.core.interpreter import Rules
from jaxpass.core.report import PassReport

X = jnp.ones((2, 8))
P = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}}


def f(p, x):
    return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def test_rule_that_matches_nothing_names_the_pattern():
    with pytest.raises(jaxpass.PassError, match=r"'attn'.*match no parameter path"):
        jaxpass.transform(f, [passes.Quantize(include="attn")], params=P, example_args=(X,))
    # ... unless allowed; then the pass finds nothing to quantize and says so.
    with pytest.raises(jaxpass.PassError, match="matches none of the matmul weights"):
        jaxpass.transform(f, [passes.Quantize(include=["attn", "bias"], allow_unmatched=True)],
                          params=P, example_args=(X,))


def test_model_closing_over_its_weights_is_refused_with_the_constant_shape():
    w = jax.random.normal(jax.random.key(1), (64, 32))
    closed_over = lambda p, x: jnp.tanh(x @ w) * p["s"]
    with pytest.raises(jaxpass.PassError, match=r"closes over large arrays \(float32\[64, 32\]\)"):
        jaxpass.transform(closed_over, [passes.Quantize()], params={"s": jnp.ones(())},
                          example_args=(jnp.ones((2, 64)),))
    with pytest.raises(jaxpass.ModelError, match="pass params="):
        jaxpass.transform(lambda x: x @ w, [passes.Quantize()], example_args=(jnp.ones((2, 64)),))


def test_non_array_leaves_in_params_name_the_path():
    with pytest.raises(jaxpass.ModelError, match=r"params\['dense'\]\['scale'\] is a float"):
        jaxpass.transform(f, [], params={"dense": {**P["dense"], "scale": 1.0}}, example_args=(X,))


def test_nan_weights_name_the_parameter():
    bad = {"dense": {**P["dense"], "kernel": P["dense"]["kernel"].at[0, 0].set(jnp.nan)}}
    with pytest.raises(jaxpass.PassError, match=r"\['dense'\]\['kernel'\] has 1 NaN/inf"):
        jaxpass.transform(f, [passes.Quantize()], params=bad, example_args=(X,))


def test_pass_order_mistake_is_reported():
    @dataclasses.dataclass(frozen=True)
    class LateDummy:
        order: ClassVar[int] = 50

        def run(self, program):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(jaxpass.PassError, match=r"passes\[1\] Quantize must come before passes\[0\] LateDummy"):
        jaxpass.transform(f, [LateDummy(), passes.Quantize()], params=P, example_args=(X,))
    with pytest.raises(TypeError, match=r"passes\[0\] .* is not a pass"):
        jaxpass.transform(f, ["quantize"], params=P, example_args=(X,))


def test_quantizing_twice_is_reported_not_silently_accepted():
    with pytest.raises(jaxpass.PassError, match=r"already rewritten by \['Quantize'\]"):
        jaxpass.transform(f, [passes.Quantize(), passes.Quantize()], params=P, example_args=(X,))


def test_unsupported_configurations_say_what_is_supported():
    with pytest.raises(jaxpass.PassError, match=r"weights='int5'.*supported formats are \('int8', 'int4'"):
        passes.Quantize(weights="int5")
    with pytest.raises(jaxpass.PassError, match="group_size=0"):
        passes.Quantize(group_size=0)
    with pytest.raises(jaxpass.PassError, match="zero points apply to int8/int4"):
        passes.Quantize(weights="nf4", symmetric=False)


def test_group_size_that_does_not_divide_and_odd_int4_packing_are_refused():
    p = {"w": jax.random.normal(jax.random.key(0), (576, 64))}  # SmolLM2-like 576-wide input
    g = lambda p, x: x @ p["w"]
    with pytest.raises(jaxpass.PassError, match=r"\['w'\] has contracting dimension 576 .* not divisible by 128; group sizes that divide it: \[32, 64\]"):
        jaxpass.transform(g, [passes.Quantize(weights="int4", group_size=128)], params=p,
                          example_args=(jnp.ones((1, 576)),))
    odd = {"w": jax.random.normal(jax.random.key(0), (9, 4))}
    with pytest.raises(jaxpass.PassError, match=r"\['w'\] has an odd contracting dimension 9"):
        jaxpass.transform(g, [passes.Quantize(weights="int4")], params=odd, example_args=(jnp.ones((1, 9)),))


def test_apply_with_wrong_params_structure():
    t = jaxpass.transform(f, [passes.Quantize()], params=P, example_args=(X,))
    with pytest.raises(jaxpass.ModelError, match="structure of t.params"):
        t.apply(P, X)


def test_a_pass_that_breaks_output_types_is_caught_by_verification():
    @dataclasses.dataclass(frozen=True)
    class Broken:
        order: ClassVar[int] = 20

        def run(self, program):
            rule = lambda ctx, eqn, invals: [jnp.zeros((3,), jnp.float32)]
            return jaxpass.PassResult({}, Rules({"add": rule}), PassReport("Broken", ""))

    with pytest.raises(jaxpass.VerificationError, match="outputs changed"):
        jaxpass.transform(f, [Broken()], params=P, example_args=(X,))


def test_inputs_are_not_mutated():
    params = jax.tree_util.tree_map(np.array, P)  # numpy leaves: mutable, so check they stay
    snapshot = jax.tree_util.tree_map(np.copy, params)
    t = jaxpass.transform(f, [passes.Quantize()], params=params, example_args=(np.ones((2, 8), np.float32),))
    t(np.ones((2, 8), np.float32))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, snapshot)


def test_weight_only_used_inside_an_opaque_op_names_the_op():
    def solve(p, b):
        return jax.lax.custom_linear_solve(lambda x: p["a"] @ x, b, lambda mv, b: b / 2.0)

    with pytest.raises(jaxpass.PassError, match=r"\['a'\] .* inside custom_linear_solve"):
        jaxpass.transform(solve, [passes.Quantize(include="a")], params={"a": jnp.eye(4) * 2},
                          example_args=(jnp.ones(4),))
