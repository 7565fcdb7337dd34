"""Launch configuration of the decode-attention kernels (static: part of the jit cache key)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One program per (batch row, KV head, split); each streams its split in steps.

    ``block_k``: tokens per step (KIVI: a multiple of the key group size G; the kernel works one
    group at a time inside a step). ``num_splits``: flash-decoding's split of the sequence
    (``capacity % block_k == 0``; each split covers ``cap / num_splits`` positions rounded up to
    whole steps); more splits = more programs in flight for
    small batch * heads, at the price of a bigger f32 partial output and combine.
    ``num_warps`` / ``num_stages``: Triton's (``num_stages > 1`` software-pipelines the loads).
    ``kivi_block`` (KIVI only): 1 dequantizes a whole ``block_k`` of keys to the query dtype
    (per-group scale rows broadcast to their tokens) and runs one key dot per plane and one softmax
    update per step (2: the same with the dequantization in 16-bit arithmetic, a few more
    roundings per key); 0 works one key group at a time with the scales folded into the query
    (fewer roundings, many more small dots); 3 keeps the scales on the query side but runs one
    dot per plane for all the groups of a step (each token keeps its own group's rows). H100,
    32K (docs/decode_attention.md): KIVI-4 839 us with 0, 285-293 us with 1, 283 us with 2; 3
    not yet timed on a GPU.
    """

    block_k: int = 128
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2
    kivi_block: int = 0

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: int(v) for k, v in d.items()})
