"""Device-side timing of a jitted op from a profiler trace (CUPTI), for the GPU benchmarks.

Why not wall-clock: a decode matmul takes 5-60 us, about what the host spends launching an
executable with a few dozen argument buffers, so host timings (even the R / 2R slope of
``bench_matmul.time_per_op``) mix launch overhead into kernel time and scatter by 2-3x between
runs. Here every call is its own executable run, traced with ``jax.profiler``; the time of one
call is the device span of that run (the "XLA Modules" line of the GPU plane: its kernels plus
the gaps between them, e.g. a split-K kernel and the reduction after it), and the result is the
median over calls. Calls cycle through distinct weight copies (>= 2x the 50 MB L2 in total) so
every call reads its weight from HBM.
"""

from __future__ import annotations

import glob
import os
import shutil
import statistics
import tempfile

L2_BYTES = 50 * 2 ** 20


def copies_needed(weight_bytes: int, minimum: int = 2) -> int:
    """Distinct weight copies so that cycling through them never hits L2."""
    return max(minimum, -(-2 * L2_BYTES // max(weight_bytes, 1)) + 1)


def _module_spans_ns(path: str) -> tuple[list[float], list[tuple[str, float]]]:
    from jax.profiler import ProfileData
    pd = ProfileData.from_file(path)
    modules, kernels = [], []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name == "XLA Modules":
                modules += [e.duration_ns for e in line.events]
            elif line.name.startswith("Stream"):
                kernels += [(e.name, e.duration_ns) for e in line.events]
    return modules, kernels


def device_time_us(fn, args_list, calls: int = 40, warmup: int = 3, breakdown: bool = False):
    """Median device time in microseconds of ``jax.jit(fn)(*args)``, args cycled from the list.

    With ``breakdown=True`` returns ``(time, {kernel name: mean us per call})`` as well.
    """
    import jax
    f = jax.jit(fn)
    for i in range(warmup):
        jax.block_until_ready(f(*args_list[i % len(args_list)]))
    tmp = tempfile.mkdtemp(prefix="jp_trace_")
    try:
        jax.profiler.start_trace(tmp)
        outs = []
        for i in range(calls):
            outs.append(f(*args_list[i % len(args_list)]))
            if len(outs) > 8:
                jax.block_until_ready(outs.pop(0))
        jax.block_until_ready(outs)
        jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError("the profiler wrote no trace")
        modules, kernels = _module_spans_ns(paths[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_kernel = {}
    for name, dur in kernels:
        per_kernel[name[:60]] = per_kernel.get(name[:60], 0.0) + dur / calls / 1e3
    if len(modules) >= calls // 2:
        t = statistics.median(modules[-calls:]) / 1e3
    elif kernels:  # no module line (older profilers): total kernel time per call
        t = sum(d for _, d in kernels) / calls / 1e3
    else:
        t = None
    if t is not None:
        return (t, per_kernel) if breakdown else t
    raise RuntimeError(f"no GPU events in the trace ({len(modules)} module spans for {calls} "
                       "calls); is this a GPU backend?")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), 256 MiB f32 arrays."""
    import jax.numpy as jnp
    size = 2 ** 26
    arrs = [(jnp.full((size,), float(i), jnp.float32),) for i in range(4)]
    t_us = device_time_us(lambda a: a + 1.0, arrs, calls=16)
    return 2 * 4 * size / (t_us * 1e-6)
