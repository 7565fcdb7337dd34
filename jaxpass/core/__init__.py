"""The core: jaxpr IR access, provenance, patterns, the rewriting interpreter, the pass manager
and model adapters. :mod:`jaxpass.core.compat` is the only module that touches JAX internals."""
