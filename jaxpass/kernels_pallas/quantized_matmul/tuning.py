"""Per-shape kernel choices measured by ``scripts/bench_matmul.py`` (``tuned_configs.json``).

Keys are ``"{format}|{x dtype}|M{m_bucket}|K{k}|N{n}"`` (format as ``PackedWeight.format``, e.g.
``int4_g128_sym``); values ``{"backend": "triton" | "xla", "config": {...}, "kernel_us": ..,
"xla_us": .., "bf16_us": .., "device": ..}``. M is bucketed up to the next benchmarked M, so a
decode step with M=3 uses the M=16 entry. Shapes with no entry use :func:`default_config`.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from jaxpass.kernels_pallas.quantized_matmul.config import TritonConfig

TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
M_BUCKETS = (1, 16, 64, 128, 1024, 4096)
NUM_SMS_H100 = 132


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def key(fmt: str, x_dtype, m: int, k: int, n: int) -> str:
    return f"{fmt}|{np.dtype(x_dtype).name}|M{m_bucket(m)}|K{k}|N{n}"


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    try:
        with open(TUNED_PATH) as f:
            return json.load(f).get("entries", {})
    except FileNotFoundError:
        return {}


def lookup(fmt: str, x_dtype, m: int, k: int, n: int) -> dict | None:
    """The tuned entry for this problem, or None."""
    return _table().get(key(fmt, x_dtype, m, k, n))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def default_config(m: int, k: int, n: int, bits: int) -> TritonConfig:
    """A reasonable decode config when no tuned entry exists.

    Enough column blocks to give every SM about two programs (the weight is read once, so
    parallelism, not reuse, matters), small M blocks, and split-K only when N alone cannot fill
    the machine.
    """
    bm = min(64, max(16, _next_pow2(m)))
    bn = 128
    while bn > 16 and pl_cdiv(n, bn) < 2 * NUM_SMS_H100:
        bn //= 2
    split = 1
    while split < 8 and pl_cdiv(n, bn) * split < NUM_SMS_H100:
        split *= 2
    bk = 128 if bits == 4 else 256
    return TritonConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                        num_stages=3)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)
