"""GPTQ (Frantar et al., 2023): quantize a weight one input row at a time, pushing each row's
rounding error onto the rows not yet quantized, weighted by the inverse Hessian of the layer's
inputs (``H = X^T X`` from calibration data), so the layer's *output* error stays small.

This implementation uses static groups: scales and zero points are the round-to-nearest ones of
the original weight (per channel or per group), and GPTQ chooses the codes. With ``act_order``,
rows are visited by decreasing ``diag(H)`` (the most-used input channels first); group
membership stays by original index, so the stored layout is the same as round-to-nearest's.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxpass.core.calibration import damped_hessian
from jaxpass.passes.quantize.qarray import QArray, expand, from_codes, put_along_axis


def code_range(q: QArray) -> tuple[int, int]:
    bits = q.bits
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if q.zero is None else (0, 2 ** bits - 1)


@functools.partial(jax.jit, static_argnames=("qmin", "qmax", "act_order"))
def gptq_codes(w, h, scale, zero, exact=None, *, qmin: int, qmax: int, act_order: bool = True,
               damp: float = 0.01):
    """Codes for ``w [K, N]`` given ``h [K, K]`` and full-size ``scale``/``zero`` ``[K, N]``.

    ``exact`` (bool ``[K, N]``, optional): entries kept in full precision (dense-and-sparse
    outliers, as in SpQR): they take no rounding error, and their values as updated by the
    error of earlier rows are returned as the second result."""
    if exact is None:
        exact = jnp.zeros(w.shape, bool)
    k = w.shape[0]
    w, h = damped_hessian(w, h, damp)
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
    w, h, scale, zero, exact = w[perm], h[perm][:, perm], scale[perm], zero[perm], exact[perm]
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights for rows > i.
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    idx = jnp.arange(k)

    def row(i, carry):
        w, codes, kept = carry
        s, z, x = scale[i], zero[i], w[i]
        q = jnp.clip(jnp.round(x / s + z), qmin, qmax)
        err = jnp.where(exact[i], 0.0, (x - (q - z) * s) / u[i, i])
        w = w - jnp.where(idx > i, u[i], 0.0)[:, None] * err[None, :]
        return w, codes.at[i].set(q), kept.at[i].set(x)

    _, codes, kept = jax.lax.fori_loop(0, k, row, (w, jnp.zeros_like(w), jnp.zeros_like(w)))
    inv = jnp.argsort(perm)
    return codes[inv], kept[inv]


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
    exact = jnp.zeros(w.shape, bool)
    if rtn.outlier_idx is not None:
        exact = put_along_axis(exact, rtn.outlier_idx, True, rtn.outlier_axis())

    def one(wl, sl, zl, el, h, ka):
        def flat(a):
            return jnp.moveaxis(a, ka, 0).reshape(a.shape[ka], -1)
        shape = jnp.moveaxis(wl, ka, 0).shape
        c, kept = gptq_codes(flat(wl), h, flat(sl), flat(zl), flat(el), qmin=qmin, qmax=qmax,
                             act_order=act_order, damp=damp)
        return (jnp.moveaxis(c.reshape(shape), 0, ka), jnp.moveaxis(kept.reshape(shape), 0, ka))

    if () in hessians:
        codes, kept = one(w, full_scale, full_zero, exact, hessians[()], k_axis)
    else:
        layers = []
        for l in range(w.shape[0]):
            h = hessians.get((l,))
            if h is None:
                raise ValueError(f"{rtn.source}: no calibration statistics for layer {l}")
            layers.append(one(w[l], full_scale[l], full_zero[l], exact[l], h, k_axis - 1))
        codes, kept = jnp.stack([c for c, _ in layers]), jnp.stack([k for _, k in layers])
    out = from_codes(codes, rtn, k_axis)
    if rtn.outlier_idx is not None:  # the outliers' values after the earlier rows' updates
        vals = jnp.take_along_axis(kept, rtn.outlier_idx.astype(jnp.int32), axis=rtn.outlier_axis())
        out = dataclasses.replace(out, outlier_val=vals.astype(rtn.outlier_val.dtype))
    return out
