"""Default and measured launch configurations.

``tuned_configs.json`` maps ``"{kind}|b{batch}|kvh{kv_heads}|g{groups}|d{head_dim}|L{capacity}"``
(kind: dense, int8, kivi4, kivi2) to ``{"backend": "triton" | "xla", "config": DecodeConfig
fields, "us": kernel time, "xla_us": XLA (dequantize in graph) time, "device", "date"}``, built
from ``scripts/bench_decode_attention.py``'s ``bench_decode_attention.json`` (the fastest swept
config, and "xla" where XLA was faster in the same run). Without an entry, ``default_config``
picks enough splits to put ~16 programs per SM in flight and the largest block that divides
the capacity.
"""

from __future__ import annotations

import json
import os

from jaxpass.kernels_pallas.decode_attention.config import DecodeConfig

_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
_TABLE = None
TARGET_PROGRAMS = 2048        # ~16 programs per SM on a 132-SM H100


def kind_key(cache) -> str:
    kind = cache.kind
    return f"kivi{cache.bits}" if kind == "kivi" else kind


def key(cache, groups: int) -> str:
    b, kvh, cap, d = cache.shape
    return f"{kind_key(cache)}|b{b}|kvh{kvh}|g{groups}|d{d}|L{cap}"


def table() -> dict:
    global _TABLE
    if _TABLE is None:
        _TABLE = {}
        if os.path.exists(_PATH):
            with open(_PATH) as f:
                _TABLE = json.load(f)
    return _TABLE


def lookup(cache, groups: int):
    """``(backend, DecodeConfig)`` measured for this exact shape, or None."""
    entry = table().get(key(cache, groups))
    if not entry:
        return None
    return entry.get("backend", "triton"), DecodeConfig.from_dict(entry["config"])


def default_config(cache, groups: int) -> DecodeConfig:
    """Largest power-of-two split count <= what fills the GPU, block sizes that divide."""
    b, kvh, cap, d = cache.shape
    # 2026-11-22 H100 sweep at 32K (docs/decode_attention.md): dense bf16 within 10% across
    # block_k 64..256 and 8..32 splits; 64 tokens, 32 splits, 3 stages was fastest.
    block_k = 64
    if cache.kind == "kivi":
        # 2026-11-23 H100 sweep at 32K: the block-dequantizing KIVI variant with 128 tokens per
        # step (kivi_block=1) ran KIVI-4 in 285 us against 839 us for the per-group one.
        block_k = max(128, cache.group_size)
    elif cache.kind == "sparse":
        # 2026-11-23 H100 sweep at 32K: 32-token steps 4.7 ms, 64-token steps 37 ms (the
        # [block_k, d] index tiles of the bitmap decode spill registers)
        block_k = 32
    while block_k > 16 and cap % block_k:
        block_k //= 2
    splits = 1   # any count works (splits are rounded to whole steps); keep >= 4 steps each
    while b * kvh * splits * 2 <= TARGET_PROGRAMS and cap // (splits * 2) >= 4 * block_k:
        splits *= 2
    kivi = cache.kind == "kivi"
    # 2026-11-23 H100 sweep at head dim 64 (batch 32, 2112 tokens): KIVI-4 with 2 warps 65-68 us
    # against 77-78 us with 4 (the [rows, d*bits/8] code tiles are narrow); at head dim 128 /
    # 32K, 4 warps (docs/decode_attention.md).
    warps = 2 if kivi and d <= 64 else 4
    return DecodeConfig(block_k=block_k, num_splits=splits, num_warps=warps,
                        num_stages=2 if kivi else 3,
                        kivi_block=int(kivi and block_k % cache.group_size == 0))


def tpu_default_config(cache) -> DecodeConfig:
    """Mosaic TPU (never measured): the largest of 512/256/128 dividing the capacity (DMA tiles of
    whole lanes); splits only to give a small batch * heads grid some parallel programs."""
    b, kvh, cap, d = cache.shape
    block_k = next((bk for bk in (512, 256, 128) if cap % bk == 0), cap)
    splits = 1
    while b * kvh * splits < 8 and cap % (splits * 2 * block_k) == 0:
        splits *= 2
    return DecodeConfig(block_k=block_k, num_splits=splits, num_warps=4, num_stages=2)
