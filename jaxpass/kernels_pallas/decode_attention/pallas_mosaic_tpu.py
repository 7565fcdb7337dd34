"""Pallas Mosaic TPU split-K decode attention over dense and int8 caches (tested in interpret mode;
no TPU was used).

Grid ``(batch, kv_heads, num_splits, steps)`` with the step axis last ("arbitrary"): the online
softmax state (``m``, ``l`` as ``[rows, 128]`` lane-replicated tiles, ``acc [rows, d]``) lives in
VMEM scratch across steps, and each split writes an f32 partial that ``reference.combine`` merges,
exactly as the Triton kernel. Lengths are scalar-prefetched: the index maps clamp the block index
to the last valid block of the row, so the pipeline does not fetch blocks past the length (a
repeated block index is not copied again), and the kernel body skips them.

int8: codes are converted to the query dtype on the VPU (TPUs convert at full rate, unlike GPUs)
and per-token scales are applied to the scores / probabilities outside the MXU dots.
KIVI and sparse caches are not supported here (``check`` says so; the XLA path runs them).
Constraints on hardware: ``block_k`` a multiple of 128 (the scales' lane dimension), head dim a
multiple of 128; interpret mode accepts any ``block_k`` that divides the split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpass.kernels_pallas.decode_attention import formats as F
from jaxpass.kernels_pallas.decode_attention import reference
from jaxpass.kernels_pallas.decode_attention.config import DecodeConfig

_LANES = 128
_M_INIT = -1e30


def padded_rows(g: int) -> int:
    """Query rows per program, a multiple of 8 (the TPU sublane count)."""
    return max(8, -(-g // 8) * 8)


def check(q_shape, q_dtype, cache, cfg: DecodeConfig, interpret: bool = False) -> str | None:
    """Why this kernel cannot run the problem (a message), or None."""
    if not isinstance(cache, (F.DenseKV, F.Int8KV)):
        return f"the Mosaic TPU kernel covers dense and int8 caches, not {cache.kind}"
    if jnp.dtype(q_dtype) not in (jnp.bfloat16, jnp.float32):
        return f"q dtype {jnp.dtype(q_dtype)} is not bf16/f32"
    b, kvh, cap, d = cache.shape
    if cfg.num_splits < 1 or cap % (cfg.num_splits * cfg.block_k):
        return (f"capacity {cap} is not a multiple of num_splits * block_k = "
                f"{cfg.num_splits} * {cfg.block_k}")
    if not interpret and (cfg.block_k % _LANES or d % _LANES):
        return f"block_k={cfg.block_k} and head_dim={d} must be multiples of 128 on TPU"
    return None


def _kernel(len_ref, q_ref, *refs, kind, block_k, split_len, steps, sm_scale, f32):
    *in_refs, acc_out, m_out, l_out, acc_sc, m_sc, l_sc = refs
    i, h, si, t = (pl.program_id(a) for a in range(4))
    kvh = pl.num_programs(1)
    length = len_ref[i * kvh + h]
    start = si * split_len + t * block_k
    prec = lax.Precision.HIGHEST if f32 else None
    dn_t = (((1,), (1,)), ((), ()))
    dn = (((1,), (0,)), ((), ()))

    @pl.when(t == 0)
    def _():
        acc_sc[...] = jnp.zeros_like(acc_sc)
        m_sc[...] = jnp.full_like(m_sc, _M_INIT)
        l_sc[...] = jnp.zeros_like(l_sc)

    @pl.when(start < length)
    def _():
        q = q_ref[...].astype(jnp.float32) * sm_scale
        cd = q_ref.dtype
        if kind == "dense":
            k_ref, v_ref = in_refs
            k, v = k_ref[...].astype(cd), v_ref[...].astype(cd)
            s = lax.dot_general(q.astype(cd), k, dn_t, preferred_element_type=jnp.float32,
                                precision=prec)
            vs = None
        else:
            kq_ref, vq_ref, ks_ref, vs_ref = in_refs
            k, v = kq_ref[...].astype(cd), vq_ref[...].astype(cd)
            s = lax.dot_general(q.astype(cd), k, dn_t, preferred_element_type=jnp.float32,
                                precision=prec) * ks_ref[...][None, :]
            vs = vs_ref[...][None, :]
        idx = start + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(idx < length, s, -jnp.inf)
        m_prev = m_sc[...][:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        corr = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        l_sc[...] = jnp.broadcast_to(corr * l_sc[...][:, :1] + jnp.sum(p, axis=1, keepdims=True),
                                     l_sc.shape)
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        pw = p if vs is None else p * vs
        acc_sc[...] = corr * acc_sc[...] + lax.dot_general(
            pw.astype(cd), v, dn, preferred_element_type=jnp.float32, precision=prec)

    @pl.when(t == steps - 1)
    def _():
        acc_out[...] = acc_sc[...]
        l = l_sc[...]
        m_out[...] = jnp.where(l > 0, m_sc[...], -jnp.inf)
        l_out[...] = l


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def decode_attention_tpu(q, cache, lengths, *, scale, config: DecodeConfig,
                         interpret: bool = False):
    """Split-K decode attention on TPU (module docstring); same meaning as the reference."""
    from jax.experimental.pallas import tpu as pltpu

    ln = reference.check_args(q, cache, lengths)
    why = check(q.shape, q.dtype, cache, config, interpret)
    if why:
        raise ValueError(f"mosaic_tpu kernel: {why}")
    b, kvh, cap, d = cache.shape
    hq = q.shape[1]
    g = hq // kvh
    gp = padded_rows(g)
    cfg = config
    P, bk = cfg.num_splits, cfg.block_k
    S = cap // P
    steps = S // bk
    qg = q.reshape(b, kvh, g, d)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - g), (0, 0)))

    def block(i, h, s, t, len_ref):
        """Block index along L: clamped to the row's last valid block (not fetched twice)."""
        last = jnp.maximum(len_ref[i * kvh + h] - 1, 0) // bk
        return jnp.minimum(s * steps + t, jnp.maximum(last, s * steps))

    row = pl.BlockSpec((None, None, bk, d), lambda i, h, s, t, L: (i, h, block(i, h, s, t, L), 0))
    vec = pl.BlockSpec((None, None, bk), lambda i, h, s, t, L: (i, h, block(i, h, s, t, L)))
    if isinstance(cache, F.DenseKV):
        kind, arrays, specs = "dense", [cache.k, cache.v], [row, row]
    else:
        kind = "int8"
        arrays = [cache.k_q, cache.v_q, cache.k_scale, cache.v_scale]
        specs = [row, row, vec, vec]
    out_idx = lambda i, h, s, t, L: (i, h, s, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kvh, P, steps),
        in_specs=[pl.BlockSpec((None, None, gp, d), lambda i, h, s, t, L: (i, h, 0, 0))] + specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, d), out_idx),
                   pl.BlockSpec((None, None, None, gp, _LANES), out_idx),
                   pl.BlockSpec((None, None, None, gp, _LANES), out_idx)],
        scratch_shapes=[pltpu.VMEM((gp, d), jnp.float32), pltpu.VMEM((gp, _LANES), jnp.float32),
                        pltpu.VMEM((gp, _LANES), jnp.float32)],
    )
    kernel = functools.partial(_kernel, kind=kind, block_k=bk, split_len=S, steps=steps,
                               sm_scale=float(scale), f32=q.dtype == jnp.float32)
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, kvh, P, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, P, gp, _LANES), jnp.float32),
                   jax.ShapeDtypeStruct((b, kvh, P, gp, _LANES), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"jaxpass_decode_attention_tpu_{kind}",
    )(ln.reshape(-1), qg, *arrays)
    acc, m, l = acc[:, :, :, :g], m[:, :, :, :g, 0], l[:, :, :, :g, 0]
    return reference.combine(acc, m, l).reshape(b, hq, d).astype(q.dtype)
