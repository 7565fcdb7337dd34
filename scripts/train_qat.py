"""Quantization-aware fine-tuning of SmolLM2-135M at int4, and how much of the int4 loss it recovers.

Five perplexities on the same held-out text (the evaluation corpus's first windows, as in
``scripts/eval_quantization.py``), from one run:

1. the float model;
2. int4 round-to-nearest of the float model (post-training quantization);
3. QAT: ``transform(model, [Quantize(...)], mode="train")``, ``--steps`` optax AdamW steps on
   next-token loss over training text that never overlaps the held-out text, then
   ``t.finalize(params)``: real packed int4 params;
4. the control: the same fine-tune in float (``passes=[]``), so the gain of QAT is not confused
   with adapting to the corpus;
5. int4 round-to-nearest of that float fine-tune (fine-tune, then quantize).

"Recovered" is (ppl2 - ppl3) / (ppl2 - ppl1); QAT's real advantage over quantizing after a plain
fine-tune is ppl5 - ppl3.

    python scripts/train_qat.py --steps 60 --out docs/qat_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time


import jax
import jax.numpy as jnp

import jaxpass
from finetune_common import fine_tune, held_out_and_batches  # noqa: E402  (scripts/)
from jaxpass import evaluate, models, passes

EMBED = r"\['embed'\]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--train-paragraph", type=int, default=100,
                    help="first KJV chapter of training text (the held-out windows end well before)")
    ap.add_argument("--no-control", action="store_true", help="skip the float fine-tune control")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    model, tok = models.smollm2(scan_layers=True)
    held_out, data = held_out_and_batches(tok, args)
    example = (jnp.asarray(data[0][:, :-1]),)
    quant = [passes.Quantize(weights=args.weights, group_size=args.group_size, exclude=EMBED)]

    def ppl(t):
        return evaluate.perplexity(t, held_out, context_length=args.context, max_windows=args.windows)

    rows, t0 = {}, time.time()
    rows["float"] = ppl(model)
    rows["PTQ RTN"] = ppl(jaxpass.transform(model, quant, example_args=example, check_numerics=False))
    print({k: round(v, 4) for k, v in rows.items()}, flush=True)

    t_qat = jaxpass.transform(model, quant, example_args=example, mode="train", check_numerics=False)
    params, qat_losses = fine_tune(t_qat, data, args.lr, "QAT")
    rows["QAT -> int4"] = ppl(t_qat.finalize(params))
    print({k: round(v, 4) for k, v in rows.items()}, flush=True)

    float_losses = None
    if not args.no_control:
        t_float = jaxpass.transform(model, [], example_args=example, mode="train", check_numerics=False)
        params, float_losses = fine_tune(t_float, data, args.lr, "float fine-tune")
        rows["float fine-tune"] = ppl(t_float.finalize(params))
        rows["float fine-tune -> PTQ RTN"] = ppl(t_float.finalize(params, passes=quant))

    gap = rows["PTQ RTN"] - rows["float"]
    recovered = (rows["PTQ RTN"] - rows["QAT -> int4"]) / gap if gap > 0 else float("nan")
    meta = dict(command="python scripts/train_qat.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v not in (None, False) and k != "no_control") + (" --no-control" if args.no_control else ""),
        device=f"CPU ({platform.machine()}), jax {jax.__version__}", date=str(datetime.date.today()),
        quantize=repr(quant[0]), train_tokens=args.steps * args.batch * args.seq,
        held_out_tokens=args.context * args.windows, seconds=round(time.time() - t0, 1))
    print(f"\n{meta}\n| model | perplexity |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} |")
    print(f"QAT recovers {100 * recovered:.1f}% of the {args.weights} round-to-nearest perplexity gap")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, ppl=rows, recovered=recovered, qat_losses=qat_losses,
                           float_losses=float_losses), f, indent=1)


if __name__ == "__main__":
    main()
