"""Pruning: one-shot methods (magnitude, Wanda, SparseGPT), sparse values, sparse training."""

from jaxpass.passes.sparsify.pass_ import Sparsify
from jaxpass.passes.sparsify.training import cubic_schedule, sparse_optimizer, update_masks
from jaxpass.passes.sparsify.values import MaskedWeight, SparseArray

__all__ = ["Sparsify", "SparseArray", "MaskedWeight", "cubic_schedule", "sparse_optimizer",
           "update_masks"]
