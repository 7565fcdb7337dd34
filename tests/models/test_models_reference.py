"""Equivalence with Hugging Face transformers (PyTorch, float32).

Needs torch (``pip install torch==2.13.0``) and transformers; skipped cleanly without them.
"""

import numpy as np
import pytest

from jaxpass.models import configs
from jaxpass.models.config import RopeScaling
from jaxpass.models.weights import to_hf_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.reference

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. However little known the feelings or views of such "
        "a man may be on his first entering a neighbourhood, this truth is so well fixed in the "
        "minds of the surrounding families, that he is considered the rightful property of some "
        "one or other of their daughters.")


def _rel_err(ours, ref):
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def _hf_model(config, hf_type):
    cfg = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
               intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
               num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
               rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
               tie_word_embeddings=config.tie_embeddings,
               max_position_embeddings=config.max_position_embeddings)
    if config.rope_scaling is not None:
        s = config.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                               "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    if hf_type == "qwen2":
        hf_cfg = transformers.Qwen2Config(**cfg, use_sliding_window=False)
        return transformers.Qwen2ForCausalLM(hf_cfg)
    hf_cfg = transformers.LlamaConfig(**cfg, attention_bias=config.qkv_bias, head_dim=config.head_dim)
    return transformers.LlamaForCausalLM(hf_cfg)


@pytest.mark.parametrize("hf_type,config", [
    ("llama", configs.tiny(num_layers=2, rope_scaling=RopeScaling(
        "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=32), tie_embeddings=True)),
    ("qwen2", configs.tiny(num_layers=2, qkv_bias=True, num_kv_heads=1)),
])
def test_random_weights_match_transformers(hf_type, config):
    hf = _hf_model(config, hf_type).float().eval()
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    from jaxpass.models.weights import load_hf_weights
    model = load_hf_weights(config, tensors)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(ids.astype(np.int32)))
    assert _rel_err(ours, ref) < 1e-5
    assert set(to_hf_tensors(model)) == set(tensors) - ({"lm_head.weight"} if config.tie_embeddings else set())


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_file, smollm2_model):
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    import os
    model, tok = smollm2_model
    ids = tok.encode(TEXT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_file), gguf_file=os.path.basename(smollm2_file),
        dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(model(np.asarray([ids], np.int32)))
    err = _rel_err(ours, ref)
    print(f"SmolLM2 GGUF vs transformers: {len(ids)} tokens, relative error {err:.2e}, "
          f"max abs {np.abs(ours - ref).max():.2e}, same argmax {np.mean(ours.argmax(-1) == ref.argmax(-1)):.3f}")
    assert err < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_from_safetensors_reads_a_transformers_checkpoint(tmp_path):
    config = configs.tiny(num_layers=1, rope_scaling=RopeScaling(
        "llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=32))
    hf = _hf_model(config, "llama").float().eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    from jaxpass import models
    model, _ = models.from_safetensors(tmp_path)
    assert model.config.rope_scaling == config.rope_scaling
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert _rel_err(np.asarray(model(ids.astype(np.int32))), ref) < 1e-5
