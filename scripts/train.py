"""Sharded training of a Llama-family model with jaxpass: plain, QAT or sparse, any preset.

One script for one CPU, several GPUs of one host, and multi-host pods (one process per host):

    # one process, all local devices, FSDP over 8 devices
    python scripts/train.py --model tiny --preset fsdp --mesh fsdp=8 --steps 20
    # 2 processes on one machine (CPU: gloo collectives), tensor parallel over both
    python scripts/train.py --coordinator localhost:12355 --num-processes 2 --process-id 0 ... &
    python scripts/train.py --coordinator localhost:12355 --num-processes 2 --process-id 1 ...
    # a pod: the launcher sets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    # (or the cluster is auto-detected by jax.distributed.initialize)

Steps: ``jax.distributed`` is initialized from flags or the environment (and the process count is
checked against the coordinator before anything compiles); the model (``--model tiny``,
``smollm2`` for SmolLM2-135M's weights, or ``llama32_1b`` random-init, ``--layers`` to shorten it)
is transformed with ``--mode plain`` (``passes.Shard`` only), ``qat`` (``Quantize(int4, g64)``
in train mode, then Shard) or ``sparse`` (``Sparsify(2:4)`` in train mode, then Shard); optax
AdamW steps on next-token loss over synthetic token batches (a pure function of the seed and
the step, so a resumed run sees exactly the batches an uninterrupted one would); orbax saves
the sharded params, optimizer state and step every ``--ckpt-every`` steps and ``--resume``
restores them into the same shardings, so resuming is exact.

Prints and writes (``--out``) a JSON record: losses per step, steady-state step time, tokens/s,
the mesh, devices and the params' shardings; ``--decode-tokens N`` also times KV-cached greedy
decoding of the transformed model under the mesh (tokens/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time


def parse_mesh(text: str) -> dict:
    """``"fsdp=2,tensor=4"`` -> ``{"fsdp": 2, "tensor": 4}`` (one size may be -1)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        if not name or not size.lstrip("-").isdigit():
            raise SystemExit(f"--mesh {text!r}: expected name=size[,name=size], e.g. fsdp=2,tensor=4")
        out[name.strip()] = int(size)
    return out


def init_distributed(args) -> None:
    """``jax.distributed.initialize`` from flags, else from JAX_COORDINATOR_ADDRESS /
    JAX_NUM_PROCESSES / JAX_PROCESS_ID, else nothing (one process). Bad counts fail here,
    before anything is compiled."""
    import jax

    addr = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = args.num_processes if args.num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    pid = args.process_id if args.process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    if addr is None and n is None and pid is None and not args.distributed_auto:
        return
    if args.distributed_auto:
        jax.distributed.initialize()
        return
    if addr is None or n is None or pid is None:
        raise SystemExit("multi-process run: give --coordinator, --num-processes and --process-id "
                         "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) together; "
                         f"got coordinator={addr!r}, num_processes={n!r}, process_id={pid!r}")
    n, pid = int(n), int(pid)
    if n < 1 or not 0 <= pid < n:
        raise SystemExit(f"--process-id {pid} must be in [0, {n}) for --num-processes {n}")
    # Pre-flight (jaxpass.sharding.distributed): processes that disagree on the count, or one
    # that never started, fail here with a clear message in every process, before XLA's
    # rendezvous (which would abort after its timeout) and before anything is compiled.
    from jaxpass.sharding import distributed
    try:
        distributed.initialize(addr, n, pid, timeout=args.init_timeout)
    except distributed.DistributedConfigError as e:
        raise SystemExit(f"[train] process {pid}: {e}") from e


def build_model(args):
    from jaxpass import models

    if args.model == "smollm2":
        model, _ = models.smollm2()
        if args.layers:
            raise SystemExit("--layers applies to the random-init configs (tiny, llama32_1b)")
        return model
    cfg_fn = {"tiny": models.configs.tiny, "llama32_1b": models.configs.llama32_1b}[args.model]
    over = {"dtype": args.dtype, "scan_layers": args.scan_layers}
    if args.layers:
        over["num_layers"] = args.layers
    return models.random_model(cfg_fn(**over), seed=args.seed)


def batch_at(step: int, args, vocab: int):
    """The global batch of ``step``: int32 ``[batch, seq + 1]``, a function of (seed, step) only."""
    import numpy as np

    rng = np.random.default_rng([args.seed, step])
    return rng.integers(0, vocab, (args.batch, args.seq + 1), dtype=np.int32)


def make_passes(args, mesh):
    from jaxpass import passes

    embed = r"\['embed'\]"
    pre = []
    if args.mode == "qat":
        pre = [passes.Quantize(weights=args.qat_weights, group_size=args.qat_group_size, exclude=embed)]
    elif args.mode == "sparse":
        pre = [passes.Sparsify(pattern=args.sparse_pattern, exclude=embed)]
    return pre + [passes.Shard(mesh=mesh, preset=args.preset)]


def make_optimizer(args):
    import optax

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, weight_decay=0.0))
    if args.mode == "sparse":
        from jaxpass.passes.sparsify import sparse_optimizer
        opt = sparse_optimizer(opt)
    return opt


# -- checkpoints: flat {path: array} dicts, so custom pytree nodes (QAT / sparse values) and
#    optax states round-trip through orbax by structure, restored into the live shardings.
def _flat(tree):
    import jax
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save_checkpoint(manager, step, params, opt_state):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave({"params": _flat(params), "opt": _flat(opt_state)}))
    manager.wait_until_finished()


def restore_checkpoint(manager, params, opt_state):
    import jax
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    target = {"params": _flat(params), "opt": _flat(opt_state)}
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    got = manager.restore(step, args=ocp.args.StandardRestore(target))
    unflat = lambda tree, flat: jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(tree), [flat[k] for k in _flat(tree)])
    return step, unflat(params, got["params"]), unflat(opt_state, got["opt"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", choices=("tiny", "smollm2", "llama32_1b"))
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (random-init configs)")
    ap.add_argument("--dtype", default="float32", help="compute dtype of the random-init configs")
    ap.add_argument("--scan-layers", action="store_true", help="scan over stacked layers")
    ap.add_argument("--mode", default="plain", choices=("plain", "qat", "sparse"))
    ap.add_argument("--qat-weights", default="int4")
    ap.add_argument("--qat-group-size", type=int, default=64)
    ap.add_argument("--sparse-pattern", default="2:4")
    ap.add_argument("--preset", default="fsdp", choices=("dp", "fsdp", "tp", "fsdp+tp"))
    ap.add_argument("--mesh", default=None, help="axis sizes, e.g. fsdp=2,tensor=4 (default: the "
                    "preset's axis over all devices)")
    ap.add_argument("--axis-types", default="auto", choices=("auto", "explicit"))
    ap.add_argument("--devices", type=int, default=None, help="use only the first N devices")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--microbatches", type=int, default=1, help="gradient accumulation: split each "
                    "batch into this many equal microbatches (same step, less memory)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ckpt-dir", default=None)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (as if interrupted) after this step")
    ap.add_argument("--warmup", type=int, default=2, help="steps excluded from the timing")
    ap.add_argument("--decode-tokens", type=int, default=0, help="also time greedy decoding of N tokens")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--distributed-auto", action="store_true", help="jax.distributed.initialize() "
                    "with cluster auto-detection (TPU pods, SLURM)")
    ap.add_argument("--init-timeout", type=int, default=120)
    ap.add_argument("--cpu-collectives", default=None, help="e.g. gloo for multi-process CPU runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.microbatches < 1 or args.batch % args.microbatches:
        raise SystemExit(f"--microbatches {args.microbatches} must divide --batch {args.batch}")

    init_distributed(args)

    import numpy as np
    import jax
    import jax.numpy as jnp
    import optax

    import jaxpass
    from jaxpass import sharding

    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    default_axis = {"dp": "data", "fsdp": "fsdp", "tp": "tensor", "fsdp+tp": "fsdp"}[args.preset]
    axes = parse_mesh(args.mesh) if args.mesh else {default_axis: len(devices)}
    if args.preset == "fsdp+tp" and not args.mesh:
        axes = {"fsdp": -1, "tensor": 2}
    mesh = sharding.make_mesh(axes, axis_types=args.axis_types, devices=devices)
    lead = jax.process_index() == 0
    log = (lambda *a: print(*a, flush=True)) if lead else (lambda *a: None)
    log(f"[train] processes={jax.process_count()} devices={len(devices)} mesh={sharding.axis_sizes(mesh)} "
        f"({args.axis_types}) preset={args.preset} mode={args.mode} model={args.model}")

    model = build_model(args)
    vocab = model.config.vocab_size
    example = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    t0 = time.perf_counter()
    t = jaxpass.transform(model, make_passes(args, mesh), example_args=(example,),
                          mode="inference" if args.mode == "plain" else "train", check_numerics=False)
    transform_s = time.perf_counter() - t0
    del model
    opt = make_optimizer(args)
    batch_axes = sharding.preset_rules(args.preset, sharding.axis_sizes(mesh))[0][1]

    def loss_fn(params, ids):
        logits = t.apply(params, ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    params = t.params
    param_shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    # Optimizer moments take their params' shardings; everything else (step counts) is
    # replicated over the mesh, so every jit argument lives on the same devices.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    on_mesh = lambda x: (x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
                         and x.sharding.mesh == mesh else replicated)
    opt_shardings = jax.tree_util.tree_map(on_mesh, jax.eval_shape(opt.init, params))
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)

    def grads_of(params, ids):
        if args.microbatches == 1:
            return jax.value_and_grad(loss_fn)(params, ids)
        # Gradient accumulation over equal microbatches: the mean of their means is the full
        # batch's mean, so the step is the same as one big batch, in less activation memory.
        mb = ids.reshape(args.microbatches, -1, ids.shape[1])

        def body(acc, x):
            loss, g = jax.value_and_grad(loss_fn)(params, x)
            return jax.tree_util.tree_map(jnp.add, acc, (loss, g)), None

        zero = jax.tree_util.tree_map(jnp.zeros_like, (jnp.zeros((), jnp.float32), params))
        total, _ = jax.lax.scan(body, zero, mb)
        return jax.tree_util.tree_map(lambda x: x / args.microbatches, total)

    def step_fn(params, opt_state, ids):
        loss, grads = grads_of(params, ids)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step_fn, out_shardings=(param_shardings, opt_shardings, None), donate_argnums=(0, 1))

    manager, start = None, 0
    if args.ckpt_dir:
        import orbax.checkpoint as ocp
        manager = ocp.CheckpointManager(os.path.abspath(args.ckpt_dir),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2))
        if args.resume:
            got = restore_checkpoint(manager, params, opt_state)
            if got is not None:
                start, params, opt_state = got
                log(f"[train] resumed from step {start}")

    def global_batch(i):
        rows = batch_at(i, args, vocab)
        per = args.batch // jax.process_count()
        local = rows[jax.process_index() * per:(jax.process_index() + 1) * per]
        return sharding.shard_batch(local, mesh, batch_axes)

    losses, times = {}, []
    last = min(args.steps, args.stop_after or args.steps)
    for i in range(start, last):
        ids = global_batch(i)
        t1 = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, ids)
        loss = float(loss)  # blocks: the step is timed end to end
        times.append(time.perf_counter() - t1)
        losses[i + 1] = loss
        log(f"[train] step {i + 1} loss {loss:.6f} ({times[-1] * 1e3:.1f} ms)")
        if manager is not None and args.ckpt_every and (i + 1) % args.ckpt_every == 0:
            save_checkpoint(manager, i + 1, params, opt_state)
    steady = times[args.warmup:] or times
    step_s = float(np.median(steady)) if steady else float("nan")
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "jax": jax.__version__, "device": str(devices[0].device_kind), "n_devices": len(devices),
        "processes": jax.process_count(), "mesh": sharding.axis_sizes(mesh),
        "axis_types": args.axis_types, "preset": args.preset, "mode": args.mode, "model": args.model,
        "layers": args.layers, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "microbatches": args.microbatches,
        "start_step": start, "losses": losses, "transform_s": transform_s,
        "step_ms_median": step_s * 1e3, "tokens_per_s": args.batch * args.seq / step_s,
        "timed_steps": len(steady),
        "shardings": {k: v for k, v in list(sharding.shardings_of(params).items())[:64]},
    }
    if args.decode_tokens:
        record["decode"] = time_decode(t, params, mesh, args)
        log(f"[train] decode {record['decode']}")
    log(f"[train] median step {record['step_ms_median']:.1f} ms, {record['tokens_per_s']:.0f} tokens/s")
    if lead and args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


def time_decode(t, params, mesh, args) -> dict:
    """Greedy KV-cached decoding of the transformed model (trained params) under ``mesh``;
    the cache is sharded by batch and kv heads (``shard_kv_cache``)."""
    import jax
    import jax.numpy as jnp

    from jaxpass import sharding
    from jaxpass.models.generate import time_generation

    if args.mode != "plain":
        t = t.finalize(params)
        params = t.params
    t.params = params
    prompt = jnp.asarray(batch_at(10**6, args, t.model.config.vocab_size)[: args.decode_batch, :16])
    init = lambda b, n, dtype=None: sharding.shard_kv_cache(t.model.init_cache(b, n, dtype), mesh)
    return time_generation(t, prompt, args.decode_tokens, init_cache=init)


if __name__ == "__main__":
    main()
