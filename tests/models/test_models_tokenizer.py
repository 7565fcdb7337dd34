"""Tokenizers from GGUF metadata: round trips, llama.cpp's digit splitting, special tokens."""

import pytest


def test_tiny_tokenizer_round_trip_and_digits(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "the 2024 thin\tinn, ünïcode 🙂!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digits = tok.encode("12345")
    assert len(digits) == 5 and tok.decode(digits) == "12345"
    assert tok.encode(" the") == [tok.hf.token_to_id("Ġthe")]


def test_smollm2_tokenizer(smollm2_tok):
    tok = smollm2_tok
    assert tok.pre == "smollm" and tok.bos_id == 1 and tok.eos_id == 2 and not tok.add_bos
    text = "In 2024, the year's 3.14159 results were: 12 apples & 7 pears.\n\nNew paragraph."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # llama.cpp's 'smollm' pre-tokenizer isolates every digit
    pieces = [tok.token(i) for i in tok.encode("In 2024")]
    assert pieces == ["In", "Ġ", "2", "0", "2", "4"]
    # control tokens written in the text are single tokens
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat[0] == tok.hf.token_to_id("<|im_start|>") and chat[-1] == tok.hf.token_to_id("<|im_end|>")
    assert "<|im_start|>" in tok.chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.startswith("<|im_start|>system") and rendered.endswith("<|im_start|>assistant\n")


def test_known_smollm2_ids(smollm2_tok):
    # ids checked against the model's own behaviour (see test_models_gguf) and the HF vocabulary
    assert smollm2_tok.encode("The capital of France") == [504, 3575, 282, 4649]


def test_unsupported_tokenizers():
    from jaxpass.models.tokenizer import byte_level_bpe, from_gguf_fields
    with pytest.raises(ValueError, match="SentencePiece"):
        from_gguf_fields({"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="pre-tokenizer 'deepseek-coder'"):
        byte_level_bpe(["a"], [], None, "deepseek-coder")
