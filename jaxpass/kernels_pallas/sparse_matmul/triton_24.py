"""What the two 2:4 Pallas Triton kernels share (``pallas_triton``: plain values,
``int4_24_triton``: int4 codes with group scales).

Both walk K in steps of ``8 * groups``, each step two half-steps (groups ``g0`` and ``g0 + K/8``,
paired in one metadata byte); per half-step a group of 4 keeps two values ``v0, v1`` at
positions ``i0 < i1``. This module holds the config rules and default tiles, and the arithmetic
of one half-step: the row-reduce form for M <= 8 (gather the activation at each kept position)
and the tensor-core form (rebuild the four dense tiles, four dots). The block store is
``triton_common.store_block``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxpass.kernels_pallas.quantized_matmul import triton_common


def check_tiles(x_dtype, k: int, cfg) -> str | None:
    """Why ``cfg`` (block_m, block_n, groups, split_k) cannot tile a 2:4 problem of width ``k``."""
    if not triton_common.is_pow2(cfg.block_n) or cfg.block_n < 16:
        return f"block_n={cfg.block_n} must be a power of two >= 16"
    if not triton_common.is_pow2(cfg.groups) or cfg.groups < 16:
        return f"groups={cfg.groups} must be a power of two >= 16"
    if (k // 8) % cfg.groups:
        return f"K={k}: K/8={k // 8} is not a multiple of groups={cfg.groups}"
    steps = k // 8 // cfg.groups
    if cfg.split_k < 1 or steps % cfg.split_k:
        return f"split_k={cfg.split_k} does not divide the {steps} K steps (K={k}, groups={cfg.groups})"
    if not triton_common.is_pow2(cfg.block_m) or cfg.block_m > 64 or 8 < cfg.block_m < 16:
        return f"block_m={cfg.block_m}: a power of two <= 8 (row-reduce) or 16..64 (dots)"
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"x dtype {jnp.dtype(x_dtype).name} is not bf16/f16/f32"
    return None


def default_tiles(m: int, k: int, groups_ok=lambda g: True) -> tuple[int, int, int]:
    """``(block_m, groups, split_k)`` for an untuned problem (the H100 sweeps of docs/sparsity.md):
    M rows rounded up to a power of two (16 for the dot form), the largest ``groups`` <= 64 that
    tiles K (and passes ``groups_ok``), 4 or 2 K splits where they divide the steps."""
    bm = 1 if m == 1 else (2 if m == 2 else (4 if m <= 4 else (8 if m <= 8 else 16)))
    groups = 64
    while groups > 16 and ((k // 8) % groups or not groups_ok(groups)):
        groups //= 2
    steps = k // 8 // groups
    return bm, groups, next((s for s in (4, 2) if steps % s == 0), 1)


def row_sums(x_ref, i0, i1, v0, v1, *, g0, m0, m, bm, groups):
    """Row-reduce form: per row r of the block, ``sum_g v0 * x[4g + i0] + v1 * x[4g + i1]``
    (``[block_n]``). ``i0 < i1``, so i0 is in 0..2 and i1 in 1..3: two selects each."""
    out = []
    for r in range(bm):
        row_ok = jnp.broadcast_to(m0 + r < m, (groups,))
        xs = [plgpu.load(x_ref.at[jnp.int32(j), m0 + r, pl.ds(g0, groups)], mask=row_ok,
                         other=0).astype(jnp.float32)[None, :] for j in range(4)]
        xg0 = jnp.where(i0 == 0, xs[0], jnp.where(i0 == 1, xs[1], xs[2]))
        xg1 = jnp.where(i1 == 3, xs[3], jnp.where(i1 == 2, xs[2], xs[1]))
        out.append(jnp.sum(v0 * xg0 + v1 * xg1, axis=1))
    return out


def dot_tiles(acc, x_ref, i0, i1, v0, v1, *, g0, m0, m, bm, groups, prec):
    """Tensor-core form: ``acc`` plus the four dots of x's position-j columns with the dense
    tiles ``w_j`` (the weight at k = 4g + j)."""
    zero = jnp.zeros_like(v0)
    m_ok = (m0 + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)) < m
    for j in range(4):
        w = jnp.where(i0 == j, v0, zero) + jnp.where(i1 == j, v1, zero)
        xj = plgpu.load(x_ref.at[jnp.int32(j), pl.ds(m0, bm), pl.ds(g0, groups)],
                        mask=jnp.broadcast_to(m_ok, (bm, groups)), other=0)
        acc = acc + lax.dot_general(xj, w, (((1,), (1,)), ((), ())), precision=prec,
                                    preferred_element_type=jnp.float32)
    return acc

