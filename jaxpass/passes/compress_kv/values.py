"""The compressed cache as structured values (see :mod:`jaxpass.core.values`).

A model's cache is a pytree whose leaves are dense ``k_cache`` / ``v_cache`` arrays
``[b, L, kvh, d]``, one pair per layer. ``Transformed.init_cache`` replaces each pair by two
structured values standing for them:

- :class:`KVSide` ``role="k"`` holds the layer's whole compressed state (the format object of
  :mod:`jaxpass.kernels_pallas.decode_attention.formats`, or the kept slots of an eviction method);
- :class:`KVSide` ``role="v"`` holds nothing (no leaves): the K side already has the values, and
  keeping the state once means the cache pytree really is as small as the format.

Inside the rewritten program, ``jaxpass.kv_cache_update`` on a K/V side pair returns a
:class:`KVStep` / :class:`VStep` pair: the old state plus this step's tokens. ``cached_attention``
attends over it (and leaves the statistics that H2O / SnapKV / ThinK need on the step), and when
the step leaves the program (``at_program_output``) the policy computes the new state: the output
cache has exactly the input cache's structure, so it can be a ``while_loop`` carry.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxpass.core.values import StructuredValue


class KVSide(StructuredValue):
    """A layer's compressed K cache (``role="k"``, the whole state) or its V placeholder."""

    def __init__(self, role: str, state: Any, shape: tuple, dtype, layer: int, policy):
        self.role = role
        self.state = state
        self._shape = tuple(shape)
        self._dtype = dtype
        self.layer = layer
        self.policy = policy

    @property
    def format_name(self) -> str:
        return f"kv-{self.policy.name}"

    @property
    def source(self) -> str:
        return f"kv cache layer {self.layer} ({self.role})"

    @property
    def shape(self):
        return self._shape

    @property
    def dtype(self):
        return self._dtype

    def materialize(self):
        if self.role != "k":
            raise ValueError(
                f"layer {self.layer}'s compressed V cache cannot be read on its own (its data "
                "lives in the K side's state): only jaxpass.kv_cache_update / cached_attention "
                "take a compressed cache")
        return self.policy.dense_k(self.state, self._shape, self._dtype)

    def __repr__(self):
        return f"KVSide({self.role}, layer={self.layer}, {self.policy.name})"


def _flatten(s: KVSide):
    return (s.state,), (s.role, s._shape, s._dtype, s.layer, s.policy)


def _unflatten(aux, children):
    role, shape, dtype, layer, policy = aux
    return KVSide(role, children[0], shape, dtype, layer, policy)


jax.tree_util.register_pytree_node(KVSide, _flatten, _unflatten)


class _OfSide:
    """Format, source, shape and dtype of a cache step are those of its :class:`KVSide`."""

    side: "KVSide"

    @property
    def format_name(self) -> str:
        return self.side.format_name

    @property
    def source(self) -> str:
        return self.side.source

    @property
    def shape(self):
        return self.side.shape

    @property
    def dtype(self):
        return self.side.dtype


class KVStep(_OfSide, StructuredValue):
    """A layer's cache during one ``forward_cached`` step (only while the program is re-traced:
    never a pytree, never a program input)."""

    def __init__(self, side: KVSide, k_new, v_new, positions):
        self.side = side
        self.k_new = k_new
        self.v_new = v_new
        self.positions = positions
        self.stats: dict = {}        # filled by cached_attention (attention mass, channels)
        self._new_state = None

    @property
    def policy(self):
        return self.side.policy

    def new_state(self):
        if self._new_state is None:
            self._new_state = self.policy.finish(self)
        return self._new_state

    def materialize(self):
        return self.policy.dense_k(self.new_state(), self.side.shape, self.side.dtype)

    def at_program_output(self):
        s = self.side
        return KVSide("k", self.new_state(), s.shape, s.dtype, s.layer, s.policy)


class VStep(_OfSide, StructuredValue):
    """The V half of a :class:`KVStep` (its data is on the K step)."""

    def __init__(self, kstep: KVStep, side: KVSide):
        self.kstep = kstep
        self.side = side

    def materialize(self):
        return self.kstep.policy.dense_v(self.kstep.new_state(), self.side.shape, self.side.dtype)

    def at_program_output(self):
        return self.side
