"""Launch configuration of the decode-attention kernels (static: part of the jit cache key)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One program per (batch row, KV head, split); each streams its split in steps.

    ``block_k``: tokens per step (KIVI: a multiple of the key group size G; the kernel works one
    group at a time inside a step). ``num_splits``: flash-decoding's split of the sequence
    (``capacity % (num_splits * block_k) == 0``); more splits = more programs in flight for
    small batch * heads, at the price of a bigger f32 partial output and combine.
    ``num_warps`` / ``num_stages``: Triton's (``num_stages > 1`` software-pipelines the loads).
    """

    block_k: int = 128
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: int(v) for k, v in d.items()})
