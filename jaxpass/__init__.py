"""jaxpass: compiler passes over JAX programs for model compression and scaling."""

__version__ = "0.1.0"
