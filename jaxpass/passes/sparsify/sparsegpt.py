"""SparseGPT (Frantar & Alistarh, 2023): prune a weight and reconstruct the layer's output,
optionally quantizing the kept weights in the same sweep (the paper's joint mode).

Like GPTQ, it visits the weight one input row at a time and pushes each row's error onto the rows
not yet visited, weighted by the inverse Hessian of the layer's inputs (``H = X^T X``). The mask
is chosen adaptively as it goes: at the start of every block of rows (``blocksize`` rows for
unstructured sparsity, ``M`` rows for N:M) it keeps the entries with the largest
``w^2 / [U]_jj^2`` (``U`` the upper Cholesky factor of ``H^-1``), using the weights as already
updated by the earlier rows.

Joint mode: the kept entries of each row are also rounded to a symmetric integer grid, and the
row's whole error (pruned entries plus rounding of the kept ones) is what moves onto later rows.
Scales are computed as GPTQ computes them: per group of ``group`` rows, from the *current*
(already updated) weights of the group when the sweep reaches its first row, or once from the
starting weight for one scale per output channel. Zero stays code 0 (symmetric grid), so the
pruned entries stay exactly zero after quantization.

Row errors are applied lazily (GPTQ's blocked form): inside a block of ``sweep`` rows each row
updates only the block; the rows after it get the block's errors in one matmul. The result is
the row-by-row algorithm's, reordered sums aside, at a fraction of the memory traffic.

Weights are seen as ``[K, R]``: ``K`` the contracting (input) axis, ``R`` every output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core.calibration import damped_hessian
from jaxpass.passes.quantize.qarray import FORMAT_BITS, QArray, from_codes


def block_size(k: int, blocksize: int) -> int:
    """The largest power of two <= ``blocksize`` that divides ``k`` (mask-selection blocks must
    tile the rows; SmolLM2's 576 = 9 x 64 gets 64)."""
    b = 1
    while b * 2 <= blocksize and k % (b * 2) == 0:
        b *= 2
    return b


def sweep_size(k: int, *steps: int) -> int:
    """Rows per lazy-update block: a multiple of every mask/group step that divides ``k``, near
    128 (so a mask choice or a group's scale only ever reads fully updated rows)."""
    base = math.lcm(*steps)
    mult = max(1, 128 // base)
    while mult > 1 and k % (base * mult):
        mult -= 1
    return base * mult


def sparsegpt_prune(w, h, *, sparsity: float, n: int | None, m: int | None, block: int,
                    damp: float = 0.01):
    """The pruned, reconstructed ``w [K, R]`` given ``h [K, K]``: unstructured ``sparsity``
    per block of ``block`` rows, or ``n`` kept of every ``m`` rows per column (N:M)."""
    out, _, _ = _sweep(w, h, sparsity, n=n, m=m, block=block, damp=damp, qmax=None, group=None)
    return out


def sparsegpt_quantize(w, h, *, sparsity: float, n: int | None, m: int | None, block: int,
                       qmax: int, group: int | None, damp: float = 0.01):
    """Joint SparseGPT: ``(codes [K, R] int8, scale [K / group, R] f32)`` such that
    ``codes * scale`` (scale repeated over each group of rows; one row of scales for
    ``group=None``) is the pruned, quantized, reconstructed weight. Codes lie in
    ``[-qmax, qmax]`` and are 0 exactly where the weight was pruned."""
    _, codes, scale = _sweep(w, h, sparsity, n=n, m=m, block=block, damp=damp, qmax=qmax,
                             group=group)
    return codes, scale


@functools.partial(jax.jit, static_argnames=("n", "m", "block", "qmax", "group"))
def _sweep(w, h, sparsity, *, n, m, block, damp, qmax, group):
    k, r = w.shape
    w, h = damped_hessian(w, h, damp)
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    d = jnp.diag(u)
    step = m if m is not None else block
    quant = qmax is not None
    g = k if group is None else group
    # The per-channel scale comes from the starting weight, before any row is visited.
    steps = (step,) if group is None else (step, g)
    if any(k % s for s in steps):
        raise ValueError(f"SparseGPT: {k} rows are not a whole number of mask blocks / groups {steps}")
    b = sweep_size(k, *steps)
    jb = jnp.arange(b)

    def choose(wb, mask, j, i):
        """Mask for rows j .. j+step of the block (global row i), from their current values."""
        blk = lax.dynamic_slice(wb, (j, 0), (step, r))
        dd = lax.dynamic_slice(d, (i,), (step,))
        score = blk ** 2 / dd[:, None] ** 2
        if m is not None:
            ranks = jnp.argsort(jnp.argsort(-score, axis=0, stable=True), axis=0, stable=True)
            keep = (ranks < n).astype(jnp.float32)
        else:
            flat = score.reshape(-1)
            n_keep = flat.size - jnp.round(sparsity * flat.size).astype(jnp.int32)
            ranks = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
            keep = (ranks < n_keep).astype(jnp.float32).reshape(step, r)
        return lax.dynamic_update_slice(mask, keep, (j, 0))

    def group_scale(wb, scales_b, j):
        amax = jnp.max(jnp.abs(lax.dynamic_slice(wb, (j, 0), (g, r))), axis=0)
        return scales_b.at[j // g].set(jnp.where(amax > 0, amax / qmax, 1.0))

    def one_block(b0, carry):
        w, codes, scales = carry
        wb = lax.dynamic_slice(w, (b0, 0), (b, r))
        ub = lax.dynamic_slice(u, (b0, b0), (b, b))

        def row(j, c):
            wb, mask, err, codes_b, scales_b = c
            i = b0 + j
            mask = lax.cond(i % step == 0, lambda mk: choose(wb, mk, j, i), lambda mk: mk, mask)
            x = wb[j]
            q = x * mask[j]
            if quant:
                if group is None:
                    scale = scales[0]
                else:  # a group's scale from its rows as they stand when the sweep reaches it
                    scales_b = lax.cond(j % g == 0, lambda s: group_scale(wb, s, j), lambda s: s,
                                        scales_b)
                    scale = scales_b[j // g]
                c = jnp.where(mask[j] > 0, jnp.clip(jnp.round(x / scale), -qmax, qmax), 0.0)
                q = c * scale
                codes_b = codes_b.at[j].set(c)
            e = (x - q) / ub[j, j]
            wb = wb - jnp.where(jb > j, ub[j], 0.0)[:, None] * e[None, :]
            return wb.at[j].set(q), mask, err.at[j].set(e), codes_b, scales_b

        nb = 1 if group is None else b // g
        init = (wb, jnp.zeros_like(wb), jnp.zeros_like(wb), jnp.zeros_like(wb),
                jnp.ones((nb, r), jnp.float32))
        wb, _, err, codes_b, scales_b = lax.fori_loop(0, b, row, init)
        # The rows after this block receive its errors at once.
        u_rest = lax.dynamic_slice(u, (b0, 0), (b, k))
        later = (jnp.arange(k) >= b0 + b).astype(w.dtype)
        w = w - (u_rest * later[None, :]).T @ err
        w = lax.dynamic_update_slice(w, wb, (b0, 0))
        codes = lax.dynamic_update_slice(codes, codes_b, (b0, 0))
        if quant and group is not None:
            scales = lax.dynamic_update_slice(scales, scales_b, (b0 // g, 0))
        return w, codes, scales

    if quant and group is None:   # one scale per output channel, from the starting weight
        amax = jnp.max(jnp.abs(w), axis=0)
        scales = jnp.where(amax > 0, amax / qmax, 1.0)[None, :]
    else:
        scales = jnp.ones((1 if group is None else k // g, r), jnp.float32)
    carry = (w, jnp.zeros_like(w), scales)
    w, codes, scales = lax.fori_loop(0, k // b, lambda t, c: one_block(t * b, c), carry)
    if not quant:
        return w, None, None
    return w, codes.astype(jnp.int8), scales


def quantizer_range(fmt: str) -> int:
    """``qmax`` of the symmetric integer grid ``[-qmax, qmax]`` of a Quantize format."""
    return 2 ** (FORMAT_BITS[fmt] - 1) - 1


def prune_weight(w, hessians: dict, k_axis: int, n_layer_axes: int, *, sparsity: float,
                 n: int | None, m: int | None, blocksize: int, damp: float,
                 fmt: str | None = None, group_size: int | None = None, source: str = ""):
    """SparseGPT on a whole parameter: ``w`` with its contracting axis ``k_axis`` and
    ``n_layer_axes`` (0 or 1) leading stacked-layer axes; ``hessians`` maps ``()`` (plain) or
    ``(l,)`` (layer ``l``) to ``H``. Returns the pruned float weight, or with ``fmt`` the joint
    result as a symmetric :class:`~jaxpass.passes.quantize.qarray.QArray` laid out exactly as
    ``Quantize(weights=fmt, group_size=group_size)`` lays out its own (codes packed along the
    contracting axis, keepdims scales), so every consumer of quantized weights accepts it."""
    k_local = k_axis - n_layer_axes
    block = block_size(w.shape[k_axis], blocksize)
    keys = [()] if n_layer_axes == 0 else [(l,) for l in range(w.shape[0])]
    vals, codes, scales = [], [], []
    for key in keys:
        wk = jnp.moveaxis(w[key] if key else w, k_local, 0)
        flat = wk.reshape(wk.shape[0], -1)
        if fmt is None:
            res = sparsegpt_prune(flat, hessians[key], sparsity=sparsity, n=n, m=m, block=block,
                                  damp=damp)
            vals.append(jnp.moveaxis(res.reshape(wk.shape), 0, k_local))
            continue
        c, s = sparsegpt_quantize(flat, hessians[key], sparsity=sparsity, n=n, m=m, block=block,
                                  qmax=quantizer_range(fmt), group=group_size, damp=damp)
        codes.append(jnp.moveaxis(c.reshape(wk.shape), 0, k_local))
        scales.append(jnp.moveaxis(s.reshape((s.shape[0],) + wk.shape[1:]), 0, k_local))
    join = (lambda xs: jnp.stack(xs)) if n_layer_axes else (lambda xs: xs[0])
    if fmt is None:
        return join(vals).astype(w.dtype)
    c = join(codes)
    like = QArray(c, join(scales), None, jnp.dtype(w.dtype), fmt, None, source)
    return from_codes(c, like, k_axis)
