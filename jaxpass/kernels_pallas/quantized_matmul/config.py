"""Block configurations of the quantized-matmul kernels (what the autotuner searches over)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiling of the Pallas Triton weight-only kernel.

    Attributes:
      block_m: rows of x per program (>= 16: Triton's dot needs 16; padded rows are masked).
      block_n: output channels per program.
      block_k: stored weight columns per loop step (bytes for int4, i.e. ``2 * block_k`` values of
        K; values for int8). Split into group-aligned sub-blocks inside the step.
      split_k: programs sharing one output tile along K; partial sums are added by XLA afterwards.
      num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    """

    block_m: int = 16
    block_n: int = 32
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TritonConfig":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    def short(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """Tiling of the Pallas Triton W8A8 kernel (int8 x int8 -> int32 on the tensor cores)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Int8Config":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    def short(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.num_warps}p{self.num_stages}"


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiling of the word GEMV kernel.

    Attributes:
      block_n: output channels per program.
      block_words: 32-bit weight words of each channel per loop step (8 int4 / 4 int8 values each).
      split_k: programs sharing a column block along K (partials added by XLA).
      num_warps: Triton warps per program.
      num_stages: >= 2 turns on the one-step manual prefetch.
    """

    block_n: int = 64
    block_words: int = 32
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GemvConfig":
        return cls(**{f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d})

    def short(self) -> str:
        return (f"gemv_n{self.block_n}w{self.block_words}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")
