"""Provenance follows parameters through layout ops and region boundaries."""

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core import compat
from jaxpass.core.patterns import PathRule, param_dots
from jaxpass.core.provenance import Provenance


def _dots(fn, params, *args):
    closed = jax.make_jaxpr(fn)(params, *args)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return param_dots(Provenance(closed, names))


def test_layout_ops_map_contracting_axes_to_param_axes():
    p = {"w": jnp.ones((4, 2, 3))}  # [d, h, hd] used as [d, h*hd] after a cast and a transpose

    def f(p, x):
        w = p["w"].astype(jnp.bfloat16).reshape(4, 6).T  # [6, 4]
        return x @ w.T

    (use,) = _dots(f, p, jnp.ones((5, 4)))
    assert use.param == "['w']"
    assert use.contracting_axes == frozenset({0})
    assert use.free_axes == frozenset({1, 2})
    assert {"convert_element_type", "reshape", "transpose"} <= set(use.prov.via)


def test_scan_xs_slice_stacked_weights_and_keep_layer_axis_out():
    p = {"w": jnp.ones((3, 4, 4))}

    def f(p, x):
        return lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, p["w"])[0]

    (use,) = _dots(f, p, jnp.ones((2, 4)))
    assert use.site.regions == ("scan",)
    assert use.contracting_axes == frozenset({1})
    assert 0 in use.prov.sliced and 0 not in use.free_axes


def test_fori_loop_dynamic_index_and_nested_jit_and_remat():
    p = {"w": jnp.ones((3, 4, 4))}

    @jax.jit
    def layer(w, c):
        return jax.checkpoint(lambda c: jnp.tanh(c @ w))(c)

    def f(p, x, n):  # a traced trip count makes fori_loop a while loop (static: a scan)
        return lax.fori_loop(0, n, lambda i, c: layer(p["w"][i], c), x)

    (use,) = _dots(f, p, jnp.ones((2, 4)), 3)
    assert use.param == "['w']"
    assert use.site.regions[0] == "while" and "jit" in use.site.regions
    assert use.contracting_axes == frozenset({1})


def test_loop_carry_is_a_param_only_if_passed_through():
    p = {"w": jnp.ones((4, 4))}

    def passthrough(p, x):
        return lax.fori_loop(0, 2, lambda i, s: (s[0] @ s[1], s[1]), (x, p["w"]))[0]

    def changed(p, x):
        return lax.fori_loop(0, 2, lambda i, s: (s[0] @ s[1], s[1] * 2), (x, p["w"]))[0]

    assert [u.param for u in _dots(passthrough, p, jnp.ones((2, 4)))] == ["['w']"]
    assert _dots(changed, p, jnp.ones((2, 4))) == []


def test_custom_jvp_body_and_cond_branches():
    p = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 4))}

    @jax.custom_jvp
    def g(x, w):
        return jnp.sin(x @ w)

    g.defjvp(lambda primals, tangents: (g(*primals), tangents[0] @ primals[1]))

    def f(p, x):
        y = g(x, p["w"])
        return lax.cond(y.sum() > 0, lambda y: y @ p["v"], lambda y: y @ p["v"].T, y)

    uses = _dots(f, p, jnp.ones((2, 4)))
    by = {(u.param, u.site.regions[0]) for u in uses}
    assert ("['w']", "custom_jvp_call") in by
    v_axes = sorted(tuple(sorted(u.contracting_axes)) for u in uses if u.param == "['v']")
    assert v_axes == [(0,), (1,)]
    assert all(u.site.in_custom_derivative for u in uses if u.param == "['w']")


def test_path_rule():
    rule = PathRule(include=r"attn", exclude=r"k_proj")
    assert rule.matches("['attn']['q_proj']") and not rule.matches("['attn']['k_proj']")
    assert not rule.matches("['mlp']")
    assert PathRule(include=["nope", "attn"]).unmatched_includes(["['attn']"]) == ["nope"]


def test_compat_regions_cover_control_flow():
    def f(x):
        y = lax.scan(lambda c, _: (c + 1, c), x, None, length=2)[0]
        y = lax.while_loop(lambda c: c.sum() < 10, lambda c: c + 1, y)
        return lax.cond(True, lambda a: a, lambda a: -a, y)

    closed = jax.make_jaxpr(f)(jnp.ones(3))
    kinds = {e.primitive.name: len(compat.eqn_regions(e)) for e in closed.jaxpr.eqns
             if compat.eqn_regions(e)}
    assert kinds == {"scan": 1, "while": 2, "cond": 2}
