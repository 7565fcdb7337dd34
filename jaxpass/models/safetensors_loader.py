"""Loading Hugging Face checkpoints (``config.json`` + ``*.safetensors``) of Llama-family models."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from jaxpass.models.config import LlamaConfig, RopeScaling
from jaxpass.models.llama import Llama
from jaxpass.models.tokenizer import Tokenizer, from_tokenizer_json
from jaxpass.models.weights import load_hf_weights

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def config_from_hf(cfg: dict, **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict."""
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {mtype!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    n_heads = cfg["num_attention_heads"]
    kwargs = dict(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=n_heads, num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=RopeScaling.from_hf(cfg.get("rope_scaling")),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", mtype == "qwen2")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )
    if mtype == "mistral" or cfg.get("use_sliding_window"):
        kwargs["sliding_window"] = cfg.get("sliding_window")
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def from_safetensors(directory: str | os.PathLike, *, dtype="float32", param_dtype="float32",
                     **config_overrides) -> tuple[Llama, Tokenizer | None]:
    """``(model, tokenizer)`` from a Hugging Face checkpoint directory.

    The tokenizer comes from ``tokenizer.json`` (+ ``tokenizer_config.json``) when present, else
    it is None.
    """
    from safetensors.flax import load_file  # handles bfloat16, which numpy cannot

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no config.json in {directory}")
    with open(cfg_path) as f:
        config = config_from_hf(json.load(f), dtype=dtype, param_dtype=param_dtype,
                                **config_overrides)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, arr in load_file(path).items():
            tensors[name] = np.asarray(arr.astype(np.float32))
    model = load_hf_weights(config, tensors, source=directory)
    tok = None
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tok_path):
        tcfg_path = os.path.join(directory, "tokenizer_config.json")
        tcfg = json.load(open(tcfg_path)) if os.path.exists(tcfg_path) else {}
        tok = from_tokenizer_json(tok_path, tcfg)
    return model, tok
