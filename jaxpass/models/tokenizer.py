"""Byte-level BPE tokenizers built from GGUF metadata (or a ``tokenizer.json``).

A GGUF file carries the vocabulary, merges, token types and the name of llama.cpp's
pre-tokenizer (``tokenizer.ggml.pre``). llama.cpp splits text with a list of regular expressions
per pre-tokenizer (``llama-vocab.cpp``) before byte-level BPE; we reproduce those splits with the
``tokenizers`` package. For SmolLM2 ('smollm') llama.cpp first isolates every digit (``\\p{N}``)
and then applies the GPT-2 pattern: "2024" is four tokens. (transformers' GGUF loader uses plain
GPT-2 splitting and does not split digits, so it disagrees with llama.cpp on numbers.)
"""

from __future__ import annotations

from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer
from tokenizers import decoders, models as tk_models, pre_tokenizers

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp pre-tokenizer name -> the regular expressions it applies in order.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "refact": (r"\p{N}", _GPT2),
    "gpt2": (_GPT2,),
    "default": (_GPT2,),
    "llama-bpe": (_LLAMA3,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class Tokenizer:
    """``encode(text) -> list[int]`` / ``decode(ids) -> str`` with the model's special ids.

    ``add_bos`` (from the file's ``tokenizer.ggml.add_bos_token``) decides whether ``encode``
    prepends ``bos_id``; special tokens written in the text (``<|im_start|>``) are parsed as such.
    """

    def __init__(self, tokenizer: _HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None, pre: str | None = None):
        self.hf = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.pre = pre

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token(self, i: int) -> str:
        return self.hf.id_to_token(int(i))

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> str:
        """Renders ``messages`` with the file's Jinja chat template (needs ``jinja2``)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        bos = self.token(self.bos_id) if self.bos_id is not None else ""
        eos = self.token(self.eos_id) if self.eos_id is not None else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos)

    def __repr__(self):
        return (f"Tokenizer(vocab={self.vocab_size}, pre={self.pre!r}, bos={self.bos_id}, "
                f"eos={self.eos_id})")


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int] | None,
                   pre: str) -> _HFTokenizer:
    """A ``tokenizers`` byte-level BPE with llama.cpp's pre-tokenizer ``pre``."""
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                         f"{sorted(PRE_TOKENIZER_REGEXES)}")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = _HFTokenizer(tk_models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    if token_types is not None:
        special = [AddedToken(tokens[i], special=(tt == _TOKEN_CONTROL), normalized=False)
                   for i, tt in enumerate(token_types) if tt in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
        tk.add_tokens(special)
    return tk


def from_gguf_fields(fields: dict[str, Any]) -> Tokenizer:
    """A :class:`Tokenizer` from a GGUF file's ``tokenizer.*`` metadata (values already read)."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, "
                         "'gpt2', is; SentencePiece 'llama' vocabularies are not)")
    pre = fields.get("tokenizer.ggml.pre", "default")
    tk = byte_level_bpe(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"],
                        fields.get("tokenizer.ggml.token_type"), pre)
    return Tokenizer(tk, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                     eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                     pad_id=fields.get("tokenizer.ggml.padding_token_id"),
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=fields.get("tokenizer.chat_template"), pre=pre)


def from_tokenizer_json(path: str, config: dict[str, Any] | None = None) -> Tokenizer:
    """A :class:`Tokenizer` from a Hugging Face ``tokenizer.json`` (+ tokenizer_config dict)."""
    tk = _HFTokenizer.from_file(path)
    config = config or {}

    def tid(key):
        tok = config.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        return tk.token_to_id(tok) if tok else None

    return Tokenizer(tk, bos_id=tid("bos_token"), eos_id=tid("eos_token"), pad_id=tid("pad_token"),
                     add_bos=bool(config.get("add_bos_token", False)),
                     chat_template=config.get("chat_template"), pre="tokenizer.json")
