"""Pallas Mosaic TPU weight-only quantized matmul (tested in interpret mode; no TPU was used).

Grid ``(M / block_m, N / block_n, K_stored / block_k)`` with the K axis last ("arbitrary"), an f32
accumulator in VMEM scratch, and BlockSpecs that DMA one tile of x, of the packed weight and all
``G`` rows of the scales for the column block. As on GPU:

* int4 bytes hold k = 2j (low nibble) and 2j + 1 (high); x is passed as u32 words of (even, odd)
  bf16/f16 pairs (a free bitcast in XLA), split in-kernel with two integer ops, so no strided
  lane access is needed;
* codes are turned into exact floats, the dot runs on the MXU with f32 accumulation, and the
  per-group scale and offset are applied to the ``[block_m, block_n]`` partial product.

Constraints (``check``): block sizes must divide the padded problem; the wrapper pads M and N;
K_stored must be a multiple of block_k, and block_k a multiple of the group's stored columns or a
divisor of them. TPU tiling wants block_n and block_k multiples of 128 (and block_m of 8) on real
hardware; the defaults respect that where the shape allows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpass.kernels_pallas.quantized_matmul import layout
from jaxpass.kernels_pallas.quantized_matmul.layout import PackedWeight

DEFAULT = dict(block_m=128, block_n=256, block_k=256)


def _cfg(config):
    cfg = dict(DEFAULT)
    if config:
        cfg.update({k: int(v) for k, v in dict(config).items()})
    return cfg


def _pick_k(kp: int, cols_per_group: int, want: int) -> int:
    """The largest block_k <= want dividing kp that holds whole groups or sits inside one."""
    for bk in range(min(want, kp), 0, -1):
        if kp % bk == 0 and (bk % cols_per_group == 0 or cols_per_group % bk == 0):
            return bk
    return 0


def check(x_shape, x_dtype, pw: PackedWeight, config=None) -> str | None:
    """Why the kernel cannot run this problem (a message), or None."""
    if jnp.dtype(x_dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return f"x dtype {x_dtype} is not bf16/f16/f32"
    if pw.bits == 4 and jnp.dtype(x_dtype).itemsize != 2:
        return "int4 needs 16-bit activations (x is read as pairs packed in u32 words)"
    kp = pw.k // 2 if pw.bits == 4 else pw.k
    cpg = pw.group_size // 2 if pw.bits == 4 else pw.group_size
    if _pick_k(kp, cpg, _cfg(config)["block_k"]) == 0:
        return "no block_k divides K and aligns with the groups"
    return None


def _kernel(x_ref, w_ref, s_ref, *refs, bits, bk, cpg, bias, has_zeros, x_dtype, nk):
    if has_zeros:
        z_ref, o_ref, acc_ref = refs
    else:
        o_ref, acc_ref = refs
    kstep = pl.program_id(2)

    @pl.when(kstep == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    sub = min(bk, cpg)
    w_all = w_ref[...]
    x_all = x_ref[...]
    dn = (((1,), (1,)), ((), ()))
    acc = acc_ref[...]
    for j in range(bk // sub):
        w = w_all[:, j * sub:(j + 1) * sub]
        xw = x_all[:, j * sub:(j + 1) * sub]
        c0 = kstep * bk + j * sub
        g = (2 * c0 if bits == 4 else c0) // (2 * cpg if bits == 4 else cpg)
        s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        if bits == 4:
            xe = lax.bitcast_convert_type((xw & 0xFFFF).astype(jnp.uint16), x_dtype)
            xo = lax.bitcast_convert_type((xw >> 16).astype(jnp.uint16), x_dtype)
            wi = w.astype(jnp.int32)
            lo = (wi & 0xF).astype(x_dtype)
            hi = (wi >> 4).astype(x_dtype)
            d = (lax.dot_general(xe, lo, dn, preferred_element_type=jnp.float32)
                 + lax.dot_general(xo, hi, dn, preferred_element_type=jnp.float32))
            xsum = (jnp.sum(xe.astype(jnp.float32), axis=1, keepdims=True)
                    + jnp.sum(xo.astype(jnp.float32), axis=1, keepdims=True))
        else:
            d = lax.dot_general(xw, w.astype(x_dtype), dn, preferred_element_type=jnp.float32)
            xsum = jnp.sum(xw.astype(jnp.float32), axis=1, keepdims=True)
        off = jnp.float32(bias)
        if has_zeros:
            off = z_ref[pl.ds(g, 1), :].astype(jnp.float32) + bias
        acc = acc + s * (d - xsum * off)
    acc_ref[...] = acc

    @pl.when(kstep == nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def quantized_matmul_tpu(x: jax.Array, pw: PackedWeight, *, config=None,
                         interpret: bool = False) -> jax.Array:
    """``x[..., K] @ W`` with the Mosaic TPU kernel. ``config``: a dict (or tuple of pairs) of
    block_m / block_n / block_k (stored columns); hashable, since it is a static argument."""
    from jax.experimental.pallas import tpu as pltpu

    why = check(x.shape, x.dtype, pw, config)
    if why:
        raise ValueError(f"mosaic_tpu kernel: {why}")
    cfg = _cfg(config)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, pw.k)
    m = x2.shape[0]
    kp = pw.k // 2 if pw.bits == 4 else pw.k
    cpg = pw.group_size // 2 if pw.bits == 4 else pw.group_size
    bk = _pick_k(kp, cpg, cfg["block_k"])
    bm = min(cfg["block_m"], max(8, -(-m // 8) * 8))
    bn = min(cfg["block_n"], pw.n)
    mp, np_ = -(-m // bm) * bm, -(-pw.n // bn) * bn
    if pw.bits == 4:
        x2 = lax.bitcast_convert_type(x2.reshape(m, kp, 2), jnp.uint32)
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    pad_n = ((0, np_ - pw.n), (0, 0))
    data = jnp.pad(pw.data, pad_n)
    scales = jnp.pad(pw.scales, ((0, 0), (0, np_ - pw.n)))
    args = [x2, data, scales]
    g = pw.num_groups
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
                pl.BlockSpec((g, bn), lambda i, j, kk: (0, j))]
    if pw.zeros is not None:
        args.append(jnp.pad(pw.zeros, ((0, 0), (0, np_ - pw.n))))
        in_specs.append(pl.BlockSpec((g, bn), lambda i, j, kk: (0, j)))
    nk = kp // bk
    kernel = functools.partial(_kernel, bits=pw.bits, bk=bk, cpg=cpg,
                               bias=float(layout.code_bias(pw)), has_zeros=pw.zeros is not None,
                               x_dtype=x.dtype, nk=nk)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // bm, np_ // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"jaxpass_qmm_tpu_{pw.format}",
    )(*args)
    return out[:m, :pw.n].reshape(*lead, pw.n)
