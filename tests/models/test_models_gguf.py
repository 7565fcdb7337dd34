"""GGUF loading: synthetic files written from tiny models (exact), and the real SmolLM2 file."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpass import models
from jaxpass.models import configs
from jaxpass.models.gguf_loader import unpermute_qk
from jaxpass.models.weights import load_hf_weights


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    n_head = 4
    permuted = (w.reshape(n_head, 2, 32 // n_head // 2, 3).swapaxes(1, 2).reshape(w.shape))
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_synthetic_gguf_round_trip(tmp_path, gguf_writer, forward, qtype):
    config = configs.tiny(vocab_size=300)
    model = models.random_model(config, seed=5)
    expected = gguf_writer(tmp_path / "tiny.gguf", model, qtype)
    loaded, tok = models.from_gguf(tmp_path / "tiny.gguf")
    assert loaded.config.replace(rms_norm_eps=config.rms_norm_eps) == config
    assert loaded.config.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    want = load_hf_weights(config, expected)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (1, 7)), jnp.int32)
    got = forward(loaded, ids)
    np.testing.assert_allclose(got, forward(want, ids), rtol=1e-6, atol=1e-6)
    if qtype == "F32":
        np.testing.assert_allclose(got, forward(model, ids), rtol=1e-6, atol=1e-6)
    assert tok.bos_id == 1 and tok.eos_id == 2 and "im_start" in tok.chat_template


def test_unknown_architecture_and_missing_tensors(tmp_path):
    from jaxpass.models.gguf_loader import config_from_fields
    with pytest.raises(ValueError, match="architecture 'gemma'"):
        config_from_fields({"general.architecture": "gemma"}, set())
    config = configs.tiny()
    from jaxpass.models.weights import to_hf_tensors
    tensors = to_hf_tensors(models.random_model(config))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing tensors.*layers\.1\.mlp\.up_proj\.kernel"):
        load_hf_weights(config, tensors)
    tensors = to_hf_tensors(models.random_model(config))
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"q_proj.weight.*shape \(3, 3\)"):
        load_hf_weights(config, tensors)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.from_gguf("/nonexistent/model.gguf")


def test_safetensors_round_trip(tmp_path, forward):
    import json
    from safetensors.numpy import save_file
    from jaxpass.models.weights import to_hf_tensors

    config = configs.tiny(qkv_bias=True)
    model = models.random_model(config, seed=2)
    save_file({k: np.ascontiguousarray(v) for k, v in to_hf_tensors(model).items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "vocab_size": 97, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "max_position_embeddings": 256}))
    loaded, tok = models.from_safetensors(tmp_path)
    assert tok is None and loaded.config.qkv_bias
    ids = jnp.arange(6, dtype=jnp.int32)[None]
    np.testing.assert_allclose(forward(loaded, ids), forward(model, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_smollm2_loads_and_predicts_english(smollm2_model):
    model, tok = smollm2_model
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == \
        (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0
    ids = tok.encode("The capital of France is Paris. The capital of Germany is")
    logits = np.asarray(model(jnp.asarray([ids])))
    assert logits.shape == (1, len(ids), 49152) and np.isfinite(logits).all()
    assert tok.decode([int(logits[0, -1].argmax())]) == " Berlin"


def test_fast_reader_agrees_with_gguf_package(tmp_path, gguf_writer):
    import gguf
    from jaxpass.models.gguf_file import read_gguf

    path = tmp_path / "tiny.gguf"
    gguf_writer(path, models.random_model(configs.tiny(vocab_size=300, num_layers=1)), "Q8_0")
    fields, tensors = read_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert fields[key] == field.contents(), key
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for mine, ref in zip(tensors, reader.tensors):
        want = gguf.quants.dequantize(ref.data, ref.tensor_type)
        np.testing.assert_array_equal(mine.dequantize(), want.reshape(mine.shape))
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(16))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(str(tmp_path / "bad.gguf"))
