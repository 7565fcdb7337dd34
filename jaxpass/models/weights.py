"""Putting Hugging Face-named tensors into a :class:`~jaxpass.models.llama.Llama`.

Both loaders (GGUF, safetensors) first produce a dict of numpy arrays under Hugging Face's
``LlamaForCausalLM`` names and layouts (linear weights ``[out, in]``); this module is the one place
that maps those names onto the NNX module (kernels transposed to ``[in, out]``) and checks that
every parameter is provided with the right shape.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpass.models.config import LlamaConfig
from jaxpass.models.llama import Llama, abstract_model, with_scan_layers

_LAYER_MAP = {
    "self_attn.q_proj.weight": ("attn.q_proj.kernel", True),
    "self_attn.k_proj.weight": ("attn.k_proj.kernel", True),
    "self_attn.v_proj.weight": ("attn.v_proj.kernel", True),
    "self_attn.o_proj.weight": ("attn.o_proj.kernel", True),
    "self_attn.q_proj.bias": ("attn.q_proj.bias", False),
    "self_attn.k_proj.bias": ("attn.k_proj.bias", False),
    "self_attn.v_proj.bias": ("attn.v_proj.bias", False),
    "mlp.gate_proj.weight": ("mlp.gate_proj.kernel", True),
    "mlp.up_proj.weight": ("mlp.up_proj.kernel", True),
    "mlp.down_proj.weight": ("mlp.down_proj.kernel", True),
    "input_layernorm.weight": ("input_norm.weight", False),
    "post_attention_layernorm.weight": ("post_attn_norm.weight", False),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("norm.weight", False),
    "lm_head.weight": ("lm_head.kernel", True),
}
# Tensors that a checkpoint may carry but the model derives itself.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


def _target(name: str):
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m:
        entry = _LAYER_MAP.get(m.group(2))
        if entry is None:
            return None
        return (f"layers.{m.group(1)}.{entry[0]}", entry[1])
    return _TOP_MAP.get(name)


def _resolve(model, path: str):
    obj = model
    parts = path.split(".")
    for p in parts[:-1]:
        obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    return obj, parts[-1]


def load_hf_weights(config: LlamaConfig, tensors: Mapping[str, np.ndarray], *,
                    source: str = "checkpoint") -> Llama:
    """A :class:`Llama` for ``config`` holding ``tensors`` (Hugging Face names and layouts).

    Raises ``ValueError`` naming the tensors that are missing, unknown or of the wrong shape.
    """
    if config.scan_layers:
        return with_scan_layers(
            load_hf_weights(config.replace(scan_layers=False), tensors, source=source))
    model = abstract_model(config)
    expected = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        expected[".".join(str(p) for p in path)] = var
    filled = set()
    unknown = []
    for name, arr in tensors.items():
        if _IGNORED.fullmatch(name):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        tgt = _target(name)
        if tgt is None or tgt[0] not in expected:
            unknown.append(name)
            continue
        path, transpose = tgt
        arr = np.asarray(arr)
        if transpose:
            arr = arr.T
        var = expected[path]
        want = tuple(var.shape) if hasattr(var, "shape") else tuple(var.value.shape)
        if arr.shape != want:
            raise ValueError(f"{source}: tensor {name!r} has shape {arr.shape} "
                             f"(after layout change), the model expects {want} at {path!r}")
        owner, attr = _resolve(model, path)
        getattr(owner, attr).set_value(jnp.asarray(arr, dtype=config.param_dtype))
        filled.add(path)
    if unknown:
        raise ValueError(f"{source}: tensors not used by a Llama-family model with this config: "
                         f"{sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}")
    missing = sorted(set(expected) - filled)
    if missing:
        raise ValueError(f"{source}: missing tensors for model params {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return model


def to_hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The model's params under Hugging Face names and layouts (inverse of
    :func:`load_hf_weights`): for exporting to safetensors/GGUF and for reference tests."""
    model = with_scan_layers(model, False)
    inverse_layer = {v[0]: (k, v[1]) for k, v in _LAYER_MAP.items()}
    inverse_top = {v[0]: (k, v[1]) for k, v in _TOP_MAP.items()}
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(str(p) for p in path)
        arr = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
        if m:
            name, transpose = inverse_layer[m.group(2)]
            name = f"model.layers.{m.group(1)}.{name}"
        else:
            name, transpose = inverse_top[key]
        out[name] = arr.T if transpose else arr
    return out
