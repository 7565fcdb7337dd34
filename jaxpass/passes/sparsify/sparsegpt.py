"""SparseGPT (Frantar & Alistarh, 2023): prune a weight and reconstruct the layer's output.

Like GPTQ, it visits the weight one input row at a time and pushes each row's error (here: the
pruned entries) onto the rows not yet visited, weighted by the inverse Hessian of the layer's
inputs (``H = X^T X``). The mask is chosen adaptively as it goes: at the start of every block of
rows (``blocksize`` rows for unstructured sparsity, ``M`` rows for N:M) it keeps the entries with
the largest ``w^2 / [U]_jj^2`` (``U`` the upper Cholesky factor of ``H^-1``), using the weights as
already updated by the earlier rows.

Weights are seen as ``[K, R]``: ``K`` the contracting (input) axis, ``R`` every output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpass.core.calibration import damped_hessian


def block_size(k: int, blocksize: int) -> int:
    """The largest power of two <= ``blocksize`` that divides ``k`` (mask-selection blocks must
    tile the rows; SmolLM2's 576 = 9 x 64 gets 64)."""
    b = 1
    while b * 2 <= blocksize and k % (b * 2) == 0:
        b *= 2
    return b


@functools.partial(jax.jit, static_argnames=("n", "m", "block"))
def sparsegpt_prune(w, h, *, sparsity: float, n: int | None, m: int | None, block: int,
                    damp: float = 0.01):
    """The pruned, reconstructed ``w [K, R]`` given ``h [K, K]``: unstructured ``sparsity``
    per block of ``block`` rows, or ``n`` kept of every ``m`` rows per column (N:M)."""
    k, r = w.shape
    w, h = damped_hessian(w, h, damp)
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    d = jnp.diag(u)
    idx = jnp.arange(k)
    step = m if m is not None else block

    def choose(w, mask, i):
        blk = lax.dynamic_slice(w, (i, 0), (step, r))
        dd = lax.dynamic_slice(d, (i,), (step,))
        score = blk ** 2 / dd[:, None] ** 2
        if m is not None:
            keep_n = n
            ranks = jnp.argsort(jnp.argsort(-score, axis=0, stable=True), axis=0, stable=True)
            keep = (ranks < keep_n).astype(jnp.float32)
        else:
            flat = score.reshape(-1)
            n_keep = flat.size - jnp.round(sparsity * flat.size).astype(jnp.int32)
            ranks = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
            keep = (ranks < n_keep).astype(jnp.float32).reshape(step, r)
        return lax.dynamic_update_slice(mask, keep, (i, 0))

    def row(i, carry):
        w, mask = carry
        mask = lax.cond(i % step == 0, lambda mk: choose(w, mk, i), lambda mk: mk, mask)
        x = w[i]
        q = x * mask[i]
        err = (x - q) / u[i, i]
        w = w - jnp.where(idx > i, u[i], 0.0)[:, None] * err[None, :]
        return w.at[i].set(q), mask

    w, _ = lax.fori_loop(0, k, row, (w, jnp.zeros_like(w)))
    return w
