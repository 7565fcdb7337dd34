"""Cross-check jaxpass's round-to-nearest perplexities against an independent implementation.

The independent side is the Hugging Face torch model loaded from the same GGUF, with its weights
replaced by fake-quantized ones written here in torch (per output channel, or per group of the
input dimension, symmetric round to nearest). The jaxpass side is ``jaxpass.transform`` with
``passes.Quantize``. Both score the same token windows. Needs torch and accelerate (test-only:
``pip install torch==2.13.0 accelerate``).

    python scripts/crosscheck_hf.py --context 1024 --windows 4
"""

from __future__ import annotations

import argparse
import datetime
import math
import os

import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxpass
from jaxpass import evaluate, models, passes
from jaxpass.models import smollm2_path


def fake_quant(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Symmetric RTN of a torch Linear/Embedding weight [out, in] along its input dimension."""
    out, inp = w.shape
    g = inp if group is None else group
    x = w.reshape(out, inp // g, g).double()
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale), -qmax, qmax)
    return (q * scale).reshape(out, inp).to(w.dtype)


def hf_perplexity(hf, windows: np.ndarray) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            ids = torch.tensor(row[None])
            logp = torch.log_softmax(hf(ids).logits.double(), -1)[0, :-1]
            nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            count += len(row) - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    path = smollm2_path()
    model, tok = models.smollm2()
    ids = np.asarray(tok.encode(evaluate.corpus.english_text(max_chars=args.context * args.windows * 6)))
    windows = ids[: args.context * args.windows].reshape(args.windows, args.context)
    example = jnp.asarray(windows[:1], jnp.int32)
    configs = [("fp32", None, None, []),
               ("W8 per-channel (embed too)", 8, None, [passes.Quantize(weights="int8")]),
               ("W4 g64 (embed fp32)", 4, 64, [passes.Quantize(weights="int4", group_size=64,
                                                               exclude=r"\['embed'\]")])]
    rows = []
    for name, bits, group, plist in configs:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
        if bits is not None:
            with torch.no_grad():
                for mod_name, mod in hf.named_modules():
                    is_embed = isinstance(mod, torch.nn.Embedding)
                    if isinstance(mod, torch.nn.Linear) or (is_embed and bits == 8):
                        if mod_name.endswith("lm_head") and hf.config.tie_word_embeddings:
                            continue  # tied: quantized once, as the embedding
                        mod.weight.copy_(fake_quant(mod.weight, bits, group))
        ppl_hf = hf_perplexity(hf, windows)
        t = jaxpass.transform(model, plist, example_args=(example,), check_numerics=False)
        ppl_jp = evaluate.perplexity(t, windows.ravel(), context_length=args.context)
        rows.append((name, ppl_jp, ppl_hf, 100 * (ppl_jp / ppl_hf - 1)))
        print(f"{name:<30} jaxpass {ppl_jp:.4f}  transformers+torch fake-quant {ppl_hf:.4f}  "
              f"difference {rows[-1][3]:+.3f}%", flush=True)
    print(f"\n{datetime.date.today()}, CPU, {args.windows} x {args.context} tokens")
    print("| recipe | jaxpass | transformers (torch fake-quant) | difference |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:+.3f}% |")


if __name__ == "__main__":
    main()
