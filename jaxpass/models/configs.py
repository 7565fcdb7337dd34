"""Published model shapes for random-init benchmarks and tests (no weights involved)."""

from __future__ import annotations

from jaxpass.models.config import LlamaConfig, RopeScaling

_LLAMA31_SCALING = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)


def llama3_8b(**overrides) -> LlamaConfig:
    """Llama 3.1 8B: 32 layers, d=4096, GQA 32/8, vocab 128256, untied, llama3 RoPE scaling."""
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                       num_heads=32, num_kv_heads=8, rope_theta=500000.0,
                       rope_scaling=_LLAMA31_SCALING, rms_norm_eps=1e-5, tie_embeddings=False,
                       max_position_embeddings=131072).replace(**overrides)


def llama32_1b(**overrides) -> LlamaConfig:
    """Llama 3.2 1B: 16 layers, d=2048, GQA 32/8, head_dim 64, tied embeddings."""
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                       num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                       rope_scaling=_LLAMA31_SCALING, rms_norm_eps=1e-5, tie_embeddings=True,
                       max_position_embeddings=131072).replace(**overrides)


def smollm2_135m(**overrides) -> LlamaConfig:
    """SmolLM2-135M: 30 layers, d=576, GQA 9/3, head_dim 64, tied embeddings, theta 1e5."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                       num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                       tie_embeddings=True, max_position_embeddings=8192).replace(**overrides)


def tiny(**overrides) -> LlamaConfig:
    """A few-thousand-parameter decoder for unit tests (GQA 4/2, untied)."""
    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=256).replace(**overrides)
