"""The zoo through jaxpass.transform: identity is bit-exact, int8 stays within bounds.

Identity: ``passes=[]`` gives outputs and gradients bit-identical to the original program, both
jitted. int8: every matmul weight of the case (and nothing else) becomes a QArray, the bytes
saved are exactly what the format says, and the output error stays within the case's bound.
"""

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jaxpass
import program_grammar
import zoo
from jaxpass import passes
from jaxpass.passes.quantize import QArray


def _transform(zm, pass_list):
    params = zm.params if zm.kind in ("fn", "linen") else None
    return jaxpass.transform(zm.model, pass_list, params=params, example_args=zm.example_args)


def _leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]}


def _grads(t, zm):
    f = lambda p: zm.loss(t.apply(p, *zm.example_args))
    g = jax.grad(f) if zm.reverse_differentiable else jax.jacfwd(f)
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(jax.jit(g)(t.params))[0]}


@pytest.mark.parametrize("name", zoo.names())
def test_identity_is_bit_exact(name):
    zm = zoo.get(name).build()
    t = _transform(zm, [])
    np.testing.assert_array_equal(jax.jit(t.apply)(t.params, *zm.example_args), zm.run_jit())
    got, want = _grads(t, zm), zm.grads()
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=f"gradient of {path}")


@pytest.mark.parametrize("name", zoo.names())
def test_int8_quantizes_exactly_the_matmul_weights_within_bounds(name):
    zm = zoo.get(name).build()
    t = _transform(zm, [passes.Quantize(weights="int8")])
    leaves = _leaves(t.params)
    quantized = {p for p, x in leaves.items() if isinstance(x, QArray)}
    assert quantized == set(zm.weight_paths)
    rep = t.report[0]
    expected_after = sum(int(np.prod(leaves[p].qvalue.shape)) + 4 * int(np.prod(leaves[p].scale.shape))
                         for p in quantized)
    assert rep.bytes_after == expected_after
    assert rep.bytes_before == sum(zm.leaves()[p].nbytes for p in quantized)
    err = zoo.relative_error(jax.jit(t.apply)(t.params, *zm.example_args), zm.run_jit())
    assert err <= zm.int8_rtol, f"relative error {err:.3g} > {zm.int8_rtol}"
    assert rep.output_error is not None and rep.output_error <= zm.int8_rtol
    assert t.graph.count("jaxpass.quantized_dot_general") >= 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prog=program_grammar.programs())
def test_generated_programs_identity_and_int8(prog):
    t0 = jaxpass.transform(prog.fn, [], params=prog.params, example_args=(prog.x,))
    np.testing.assert_array_equal(jax.jit(t0.apply)(prog.params, prog.x), jax.jit(prog.fn)(prog.params, prog.x))
    t = jaxpass.transform(prog.fn, [passes.Quantize()], params=prog.params, example_args=(prog.x,),
                          check_numerics=False)
    quantized = {p for p, x in _leaves(t.params).items() if isinstance(x, QArray)}
    assert quantized == set(prog.weight_paths), prog.source
    err = program_grammar.relative_error(t(prog.x), prog.fn(prog.params, prog.x))
    assert err <= program_grammar.INT8_RTOL, prog.source
