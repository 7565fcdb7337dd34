"""Evaluation of plain and transformed models: perplexity, long-context retrieval, memory.

    from jaxpass import evaluate
    ppl = evaluate.perplexity(model_or_t, token_ids, context_length=1024)
    acc = evaluate.passkey(model_or_t, tok, context_length=4096, depths=(0.1, 0.5, 0.9), trials=5)
"""

from jaxpass.evaluate.corpus import english_text
from jaxpass.evaluate.memory import (kv_bytes_per_token, model_kv_bytes_per_token, param_bytes,
                                     peak_bytes, tree_bytes)
from jaxpass.evaluate.perplexity import perplexity
from jaxpass.evaluate.retrieval import needle, needle_results, passkey, passkey_results

__all__ = ["perplexity", "passkey", "passkey_results", "needle", "needle_results", "english_text",
           "tree_bytes", "kv_bytes_per_token", "model_kv_bytes_per_token", "param_bytes",
           "peak_bytes"]
