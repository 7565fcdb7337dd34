"""Pallas kernels for the ops that jaxpass passes insert.

One folder per op, in the style of tokamax: ``api.py`` (the entry point that picks an
implementation), ``reference.py`` (plain JAX; also the XLA fallback), ``layout.py`` (how weights are
stored), one file per backend (``pallas_triton.py``, ``pallas_mosaic_tpu.py``) and ``arg_specs.py``
(the shapes used for benchmarks and autotuning). Kernel modules import only ``jax`` and ``numpy`` so
that they run on a GPU box with nothing else installed. See docs/kernels.md.
"""
