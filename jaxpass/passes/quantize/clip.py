"""Weight-range (clip) search: per scale, the range shrink that minimises quantization error.

Round-to-nearest scales stretch to cover each group's largest weight; shrinking the range
(saturating the few largest weights) makes the step finer for all the others, which often lowers
the total error. Per output channel and group, each ratio ``r`` of :data:`RATIOS` (1.0 down to
0.55, llm-awq's ``auto_clip`` grid: ``max_shrink=0.5``, ``n_grid=20``; for 8-bit formats
:data:`RATIOS_8BIT`, 1.0 down to 0.81 in steps of 0.01) quantizes the weight with
range ``r * max|w|`` (``r * [min, max]`` asymmetric) and the ratio with the lowest error is kept:

- without calibration inputs, the squared *weight* error of the group (the MSE-optimal scale,
  as GPTQ's ``mse`` quantizer option searches it);
- with calibration inputs ``x [T, K]`` (AWQ's ``auto_clip``), the squared error of the group's
  partial *output* ``x[:, group] @ (w - q(w))[group]``, summed over the samples.

The result has the quantizer's scale layout and is passed to :func:`~.qarray.quantize` as
``clip=``; ragged last groups (see ``quantize``) get one ratio per true group.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxpass.passes.quantize.qarray import quantize, ragged_groups, split_outliers

RATIOS = tuple(1.0 - i / 20 for i in range(10))
#: 8-bit steps are ~16x finer than 4-bit ones, so the useful shrinks are small: 1.0 .. 0.81 in
#: steps of 0.01 (the resolution of GPTQ's ``mse`` grid, 100 points)
RATIOS_8BIT = tuple(1.0 - i / 100 for i in range(20))


def default_ratios(fmt: str) -> tuple[float, ...]:
    return RATIOS_8BIT if fmt in ("int8", "fp8") else RATIOS


def _bounds(n: int, group_size: int | None) -> list[tuple[int, int]]:
    if group_size is None:
        return [(0, n)]
    head, tail, _ = ragged_groups(n, group_size)
    return [(s, s + group_size) for s in range(0, head, group_size)] + ([(head, n)] if tail else [])


@functools.partial(jax.jit, static_argnames=("reduce_axes", "fmt", "group_size", "symmetric",
                                             "outliers", "ratios"))
def search_clip(w, x=None, *, reduce_axes: tuple[int, ...], fmt: str, group_size: int | None,
                symmetric: bool, outliers: int = 0, ratios: tuple[float, ...] | None = None):
    """Clip ratios for ``quantize(w, reduce_axes, ...)``, shaped like its scale.

    ``x [T, K]`` (optional; one reduce axis only): calibration inputs of the matmul, making the
    criterion the output error instead of the weight error. With ``outliers``, the search sees
    the dense part (outliers removed), as the quantizer does."""
    axes = tuple(sorted(a % w.ndim for a in reduce_axes))
    kept = [w.shape[d] for d in range(w.ndim) if d not in axes]
    front = jnp.moveaxis(jnp.asarray(w, jnp.float32), axes, tuple(range(len(axes))))
    wk = front.reshape(-1, math.prod(kept))
    n = wk.shape[0]
    if outliers:
        wk = split_outliers(wk, 0, outliers)[0]
    if x is not None:
        if len(axes) != 1 or x.shape[-1] != n:
            raise ValueError(f"search_clip: inputs {x.shape} do not match contracting size {n}")
        x = jnp.asarray(x, jnp.float32)
    bounds = _bounds(n, group_size)
    ratios = default_ratios(fmt) if ratios is None else ratios
    best_err = jnp.full((len(bounds), wk.shape[1]), jnp.inf)
    best = jnp.ones_like(best_err)
    for r in ratios:
        q = quantize(wk, (0,), fmt=fmt, group_size=group_size, symmetric=symmetric, clip=r)
        delta = wk - q.materialize().astype(jnp.float32)
        if x is None:
            err = jnp.stack([jnp.sum(delta[s:e] ** 2, 0) for s, e in bounds])
        else:
            err = jnp.stack([jnp.sum((x[:, s:e] @ delta[s:e]) ** 2, 0) for s, e in bounds])
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        best = jnp.where(better, r, best)
    # Back to the scale layout: one entry per stored group (a ragged grouping stores each
    # group's ratio once per gcd block), then the weight's axis order.
    if group_size is not None:
        d = ragged_groups(n, group_size)[2]
        best = jnp.concatenate([jnp.repeat(best[i:i + 1], (e - s) // d, axis=0)
                                for i, (s, e) in enumerate(bounds)])
    shape = (best.shape[0],) + (1,) * (len(axes) - 1) + tuple(kept)
    return jnp.moveaxis(best.reshape(shape), tuple(range(len(axes))), axes)
