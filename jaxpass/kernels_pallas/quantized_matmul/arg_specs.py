"""Benchmark and autotuning shapes for the quantized matmul.

Llama-3-8B projections as ``(K, N)``: attention q/o (4096x4096), MLP gate/up (4096x14336),
MLP down (14336x4096), the LM head (4096x128256), and a square 8192x8192. Decode M (1, 16, 64)
and prefill M (128, 1024, 4096).
"""

LLAMA3_8B_KN = (
    ("q_o_proj", 4096, 4096),
    ("gate_up_proj", 4096, 14336),
    ("down_proj", 14336, 4096),
    ("lm_head", 4096, 128256),
    ("square_8k", 8192, 8192),
)
DECODE_M = (1, 16, 64)
PREFILL_M = (128, 1024, 4096)
ALL_M = DECODE_M + PREFILL_M

# Weight formats benchmarked: (bits, group_size or None for per-channel, symmetric).
# SmolLM2-135M projections (hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocab 49152):
# small enough that launch and reduction overheads, not bytes, decide (docs/decode_e2e.md).
SMOLLM2_KN = (
    ("smol_q_o", 576, 576),
    ("smol_kv", 576, 192),
    ("smol_gate_up", 576, 1536),
    ("smol_down", 1536, 576),
    ("smol_lm_head", 576, 49152),
)

FORMATS = {
    "int4_g128_sym": (4, 128, True),
    "int4_g64_sym": (4, 64, True),     # SmolLM2: 576 is not a multiple of 128
    "int8_pc_sym": (8, None, True),
}
