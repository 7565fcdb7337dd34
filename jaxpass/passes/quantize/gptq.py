"""GPTQ (Frantar et al., 2023): quantize a weight one input row at a time, pushing each row's
rounding error onto the rows not yet quantized, weighted by the inverse Hessian of the layer's
inputs (``H = X^T X`` from calibration data), so the layer's *output* error stays small.

This implementation uses static groups: scales and zero points are the round-to-nearest ones of
the original weight (per channel or per group), and GPTQ chooses the codes. With ``act_order``,
rows are visited by decreasing ``diag(H)`` (the most-used input channels first); group
membership stays by original index, so the stored layout is the same as round-to-nearest's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpass.passes.quantize.qarray import QArray, expand, from_codes


def code_range(q: QArray) -> tuple[int, int]:
    if q.fmt == "int8":
        return (-127, 127) if q.zero is None else (0, 255)
    return (-7, 7) if q.zero is None else (0, 15)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "act_order"))
def gptq_codes(w, h, scale, zero, *, qmin: int, qmax: int, act_order: bool = True, damp: float = 0.01):
    """Codes for ``w [K, N]`` given ``h [K, K]`` and full-size ``scale``/``zero`` ``[K, N]``."""
    k = w.shape[0]
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
    w, h, scale, zero = w[perm], h[perm][:, perm], scale[perm], zero[perm]
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights for rows > i.
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    idx = jnp.arange(k)

    def row(i, carry):
        w, codes = carry
        s, z, x = scale[i], zero[i], w[i]
        q = jnp.clip(jnp.round(x / s + z), qmin, qmax)
        err = (x - (q - z) * s) / u[i, i]
        w = w - jnp.where(idx > i, u[i], 0.0)[:, None] * err[None, :]
        return w, codes.at[i].set(q)

    _, codes = jax.lax.fori_loop(0, k, row, (w, jnp.zeros_like(w)))
    return codes[jnp.argsort(perm)]


def gptq_quantize(w, hessians: dict, rtn: QArray, k_axis: int, *, act_order: bool = True,
                  damp: float = 0.01) -> QArray:
    """GPTQ version of the round-to-nearest QArray ``rtn`` of weight ``w``.

    ``hessians`` maps a layer index tuple to ``H``: ``{(): H}`` for a plain weight, or
    ``{(l,): H_l}`` for a weight stacked along axis 0 (one Hessian per scan iteration).
    """
    qmin, qmax = code_range(rtn)
    w = jnp.asarray(w, jnp.float32)
    full_scale = jnp.broadcast_to(expand(rtn.scale, w.shape), w.shape)
    full_zero = (jnp.zeros_like(full_scale) if rtn.zero is None
                 else jnp.broadcast_to(expand(rtn.zero, w.shape), w.shape))

    def one(wl, sl, zl, h, ka):
        wk = jnp.moveaxis(wl, ka, 0)
        shape = wk.shape
        c = gptq_codes(wk.reshape(shape[0], -1), h, jnp.moveaxis(sl, ka, 0).reshape(shape[0], -1),
                       jnp.moveaxis(zl, ka, 0).reshape(shape[0], -1), qmin=qmin, qmax=qmax,
                       act_order=act_order, damp=damp)
        return jnp.moveaxis(c.reshape(shape), 0, ka)

    if () in hessians:
        codes = one(w, full_scale, full_zero, hessians[()], k_axis)
    else:
        layers = []
        for l in range(w.shape[0]):
            h = hessians.get((l,))
            if h is None:
                raise ValueError(f"{rtn.source}: no calibration statistics for layer {l}")
            layers.append(one(w[l], full_scale[l], full_zero[l], h, k_axis - 1))
        codes = jnp.stack(layers)
    return from_codes(codes, rtn, k_axis)
