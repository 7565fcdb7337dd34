"""Loading Llama-family GGUF files (llama.cpp's format) into :class:`~jaxpass.models.llama.Llama`.

The file is parsed by :mod:`jaxpass.models.gguf_file`; quantized tensors (Q4_0, Q4_1, Q8_0,
Q4_K, Q6_K, ... whatever ``gguf.quants.dequantize`` knows)
are dequantized to float32 once at load time: the model is a float model whose values are exactly
the GGUF's dequantized weights, which is what compression passes then start from.

llama.cpp's converter permutes the rows of the Q and K projections of 'llama' architectures
(it turns Hugging Face's rotate-half RoPE into interleaved pairs); we undo that permutation so the
weights are in Hugging Face layout and the model uses rotate-half RoPE.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxpass.models.config import LlamaConfig, RopeScaling
from jaxpass.models.gguf_file import read_gguf
from jaxpass.models.llama import Llama
from jaxpass.models.tokenizer import Tokenizer, from_gguf_fields
from jaxpass.models.weights import load_hf_weights

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Architectures whose Q/K rows llama.cpp permuted at conversion time.
_PERMUTED_QK = ("llama",)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face tensor name of a llama.cpp tensor name (None if not a model weight)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` of Q/K rows (``[out, ...]``), back to HF's layout."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_fields(fields: dict[str, Any], tensor_names: set[str], **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``{arch}.*`` keys) and the tensor list."""
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{SUPPORTED_ARCHITECTURES}")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in fields:
            return fields[full]
        if required and default is None:
            raise ValueError(f"GGUF metadata {full!r} is missing")
        return default

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = get("attention.key_length", hidden // n_heads, required=False)
    vocab = get("vocab_size", None, required=False)
    if vocab is None:
        vocab = len(fields["tokenizer.ggml.tokens"])
    scaling = None
    kind = get("rope.scaling.type", None, required=False)
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif kind not in (None, "none"):
        raise ValueError(f"GGUF rope scaling type {kind!r} is not supported (supported: linear, "
                         "and per-frequency factors in rope_freqs.weight)")
    kwargs = dict(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=n_heads, num_kv_heads=int(get("attention.head_count_kv", n_heads, required=False)),
        head_dim=int(head_dim), rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
        rope_scaling=scaling,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=get("attention.sliding_window", None, required=False),
        max_position_embeddings=int(get("context_length", 4096, required=False)),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def gguf_tensors(tensors, config: LlamaConfig, arch: str) -> tuple[dict[str, np.ndarray], Any]:
    """Dequantized tensors under Hugging Face names (+ llama.cpp's rope_freqs, if any)."""
    out, rope_freqs, unknown = {}, None, []
    for t in tensors:
        arr = t.dequantize()
        if t.name == "rope_freqs.weight":
            rope_freqs = arr
            continue
        name = hf_name(t.name)
        if name is None:
            unknown.append(t.name)
            continue
        if arch in _PERMUTED_QK:
            if ".q_proj." in name:
                arr = unpermute_qk(arr, config.num_heads)
            elif ".k_proj." in name:
                arr = unpermute_qk(arr, config.num_kv_heads)
        out[name] = arr
    if unknown:
        raise ValueError(f"GGUF tensors not understood for a Llama-family model: {unknown[:10]}")
    return out, rope_freqs


def from_gguf(path: str | os.PathLike, *, dtype="float32", param_dtype="float32",
              **config_overrides) -> tuple[Llama, Tokenizer]:
    """``(model, tokenizer)`` from a Llama-family GGUF file.

    All hyperparameters come from the file's metadata; ``config_overrides`` replace fields of the
    resulting :class:`LlamaConfig` (e.g. ``max_position_embeddings``, ``scan_layers``).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    fields, tensors = read_gguf(path)
    names = {t.name for t in tensors}
    config = config_from_fields(fields, names, dtype=dtype, param_dtype=param_dtype,
                                **config_overrides)
    hf_tensors, rope_freqs = gguf_tensors(tensors, config, fields["general.architecture"])
    if rope_freqs is not None:
        config = config.replace(rope_scaling=RopeScaling(
            "freq_factors", freq_factors=tuple(float(x) for x in rope_freqs.ravel())))
    model = load_hf_weights(config, hf_tensors, source=path)
    return model, from_gguf_fields(fields)


def tokenizer_from_gguf(path: str | os.PathLike) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no tensors are dequantized)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return from_gguf_fields(read_gguf(path)[0])
