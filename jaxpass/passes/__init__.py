"""Passes: small, composable, picklable rewrites of a traced program.

Each pass has ``run(program) -> PassResult`` and an ``order`` in the pipeline (see
:mod:`jaxpass.core.pass_api`).
"""

from jaxpass.passes.compress_kv import CompressKV
from jaxpass.passes.lower_to_pallas import LowerToPallas
from jaxpass.passes.quantize import Quantize
from jaxpass.passes.shard import Shard
from jaxpass.passes.sparsify import Sparsify

__all__ = ["Quantize", "LowerToPallas", "Sparsify", "Shard", "CompressKV"]
