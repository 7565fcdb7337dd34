"""Per-shape kernel choices measured by ``scripts/bench_matmul.py --tune``.

Two tables on disk, merged at lookup: ``tuned_configs.json`` beside this module (shipped,
measured on an H100: docs/bench_matmul.md) and this machine's cache (:func:`user_table_path`:
``$JAXPASS_TUNING_DIR/quantized_matmul.json``, default ``~/.cache/jaxpass/``), which a tuning run
writes by default and whose entries win. So tuning a user's own shapes or GPU is one command and
never edits the installed package.

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

from jaxpass.kernels_pallas.quantized_matmul.config import GemvConfig, TritonConfig

TUNED_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
M_BUCKETS = (1, 16, 64, 128, 1024, 4096)
NUM_SMS_H100 = 132
GEMV_MAX_M = 1  # the word GEMV's cost grows with every row; at M = 4 the byte kernel wins (H100)


def m_bucket(m: int) -> int:
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def key(fmt: str, x_dtype, m: int, k: int, n: int) -> str:
    return f"{fmt}|{np.dtype(x_dtype).name}|M{m_bucket(m)}|K{k}|N{n}"


def user_table_path() -> str:
    """This machine's tuning cache (``$JAXPASS_TUNING_DIR`` or ``~/.cache/jaxpass``)."""
    root = os.environ.get("JAXPASS_TUNING_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxpass")
    return os.path.join(root, "quantized_matmul.json")


def read_entries(path: str) -> dict:
    """The ``entries`` of a table file ({} when the file does not exist)."""
    try:
        with open(path) as f:
            return json.load(f).get("entries", {})
    except FileNotFoundError:
        return {}


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    table = read_entries(TUNED_PATH)
    table.update(read_entries(user_table_path()))
    return table


def record(entries: dict, device: str, path: str | None = None) -> str:
    """Merges measured ``entries`` into the table at ``path`` (default: this machine's cache),
    and makes the next lookup see them. Returns the path written."""
    path = path or user_table_path()
    table = read_entries(path)
    table.update(entries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(note="written by scripts/bench_matmul.py --tune; keys: "
                            "format|x dtype|M bucket|K|N", device=device, entries=table),
                  f, indent=1, sort_keys=True)
    _table.cache_clear()
    return path


def lookup(fmt: str, x_dtype, m: int, k: int, n: int) -> dict | None:
    """The tuned entry for this problem, or None."""
    return _table().get(key(fmt, x_dtype, m, k, n))


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def default_config(m: int, k: int, n: int, bits: int) -> TritonConfig:
    """A decode config for shapes with no tuned entry, from the H100 sweeps (docs/bench_matmul.md).

    M <= 8: the GEMV variant (one row per program row, CUDA-core reduction) with 4 K splits and
    the one-step prefetch; larger M: the tensor-core dot variant with 16- or 64-row blocks. Split-K
    multiplies the programs in flight, which is what these latency-bound kernels need; it is
    reduced when N alone already gives every SM several programs.
    """
    if m <= 8:
        bm = _next_pow2(m)
        bn, bk, split = 64, (128 if bits == 4 else 256), 4
    else:
        bm = 16 if m <= 16 else 64
        bn, bk, split = 64, (256 if bits == 4 else 256), (4 if bits == 4 else 2)
    while split > 1 and pl_cdiv(n, bn) * split > 8 * NUM_SMS_H100:
        split //= 2
    kp = k // 2 if bits == 4 else k
    while bk > 16 and bk > kp:  # small K: a block no longer than the stored columns
        bk //= 2
    while split > 1 and pl_cdiv(kp, bk) < 2 * split:
        split //= 2
    return TritonConfig(block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=4,
                        num_stages=3)


def default_gemv_config(n: int) -> GemvConfig:
    """Word-GEMV config for an untuned single-row problem (H100 sweep, docs/bench_matmul.md).

    64 channels x 16 words per step; K split until there are about 4 programs per SM.
    """
    bn, split = 64, 1
    while split < 8 and pl_cdiv(n, bn) * split < 4 * NUM_SMS_H100:
        split *= 2
    return GemvConfig(block_n=bn, block_words=16, split_k=split, num_warps=4, num_stages=2)


def pl_cdiv(a: int, b: int) -> int:
    return -(-a // b)
