"""jaxpass: compiler passes over JAX programs for model compression and scaling.

    t = jaxpass.transform(model, passes=[jaxpass.passes.Quantize(weights="int8")],
                          example_args=(x,))
    y = t(x); y = t.apply(t.params, x); print(t.report); print(t.graph)
"""

from jaxpass import passes
from jaxpass.core.adapters import ModelError
from jaxpass.core.manager import VerificationError
from jaxpass.core.pass_api import Pass, PassError, PassResult
from jaxpass.checkpoint import load, save
from jaxpass.transform import Transformed, transform

__version__ = "0.1.0"

__all__ = ["transform", "Transformed", "save", "load", "passes", "Pass", "PassResult", "PassError", "ModelError",
           "VerificationError"]
