"""Benchmark shapes for the sparse matmul: Llama-3-8B projections ``(K, N)`` at decode M."""

LLAMA3_8B_KN = (
    ("q_o_proj", 4096, 4096),
    ("gate_up_proj", 4096, 14336),
    ("down_proj", 14336, 4096),
)
DECODE_M = (1, 16)
