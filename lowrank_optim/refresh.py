r"""When to recompute a basis (GaLore, Q-GaLore) or merge adapters (LoQT).

A policy is a small immutable object holding hyperparameters; its evolving state is a
few plain ints and floats written into a caller-owned dict (optimizer state), so it
checkpoints with ``weights_only=True``. Steps count the caller's updates from 0.
The protocol:

* ``due(state, step) -> bool``: is a refresh due at ``step``? Always true for the first
  call (empty state).
* ``after(state, step, similarity=None)``: record that a refresh happened at ``step``
  (``similarity`` in [0, 1] between the old and new subspaces, when known).

Policies:

* :class:`FixedGap` ``(gap, phase=0)``: refreshes at :math:`0`, then
  :math:`\phi, \phi+T, \phi+2T, \dots` with :math:`\phi` = ``phase`` if ``phase > 0`` else
  :math:`T`. With ``phase=0`` this is GaLore's :math:`0, T, 2T, \dots`; distinct phases per
  layer stagger the SVDs so that no single step pays for all of them.
* :class:`LazyCosine` ``(gap, threshold=0.4, queue_size=5, growth=2, phase=0)``
  (Q-GaLore): like :class:`FixedGap`, but after each refresh the similarity of the new
  subspace to the old one joins a queue of the last ``queue_size`` values; when the
  queue is full and its mean is at least ``threshold``, the layer's gap is multiplied
  by ``growth``. As in the reference the queue is not cleared, so a layer whose
  subspace has settled doubles its gap at every later refresh; unlike the reference
  the next refresh is ``step + gap`` (not the next multiple of the gap).
* :class:`Exponential` ``(first=100, growth=1.2, max_gap=None)`` (LoQT): events at
  :math:`0`, :math:`\tau`, then gaps :math:`\tau + \lfloor\psi^k\rfloor`,
  :math:`k = 1, 2, \dots` (:math:`\tau` = ``first``, :math:`\psi` = ``growth``): 100,
  101, 101, 101, 102, ... ``max_gap`` caps each gap (not the step position). A
  ``phase`` > 0 replaces the first gap :math:`\tau` (staggered merges).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ._checks import check_int

__all__ = ["FixedGap", "LazyCosine", "Exponential"]


def _positive_int(name: str, value) -> None:
    check_int(name, value)


def _check_phase(phase) -> None:
    check_int("phase", phase, 0)


@dataclass(frozen=True)
class FixedGap:
    gap: int
    phase: int = 0
    prefix: str = "refresh"

    def __post_init__(self):
        _positive_int("update_proj_gap", self.gap)
        _check_phase(self.phase)

    def _key(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    def due(self, state: dict, step: int) -> bool:
        nxt = state.get(self._key("next"))
        return nxt is None or step >= nxt

    def _first_gap(self, state: dict) -> int:
        return self.phase if self.phase > 0 else self._gap(state)

    def _gap(self, state: dict) -> int:
        return self.gap

    def after(self, state: dict, step: int, similarity: Optional[float] = None) -> None:
        first = not state.get(self._key("count"))  # none yet (0: a checkpoint's placeholder)
        state[self._key("next")] = step + (self._first_gap(state) if first else self._gap(state))
        state[self._key("count")] = state.get(self._key("count"), 0) + 1


@dataclass(frozen=True)
class LazyCosine(FixedGap):
    threshold: float = 0.4
    queue_size: int = 5
    growth: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"Invalid cos_threshold: {self.threshold!r} (expected 0 <= t <= 1)")
        _positive_int("queue_size", self.queue_size)
        if not self.growth >= 1.0:
            raise ValueError(f"Invalid gamma_proj: {self.growth!r} (expected >= 1)")

    def _gap(self, state: dict) -> int:
        return state.get(self._key("gap"), self.gap)

    def after(self, state: dict, step: int, similarity: Optional[float] = None) -> None:
        if similarity is not None:
            queue = state.setdefault(self._key("sims"), [])
            queue.append(float(similarity))
            del queue[: -self.queue_size]
            if len(queue) == self.queue_size and sum(queue) / len(queue) >= self.threshold:
                state[self._key("gap")] = int(self._gap(state) * self.growth)
        super().after(state, step, similarity)


@dataclass(frozen=True)
class Exponential:
    first: int = 100
    growth: float = 1.2
    max_gap: Optional[int] = None
    prefix: str = "merge"
    phase: int = 0

    def __post_init__(self):
        _positive_int("first", self.first)
        if not self.growth >= 1.0:
            raise ValueError(f"Invalid growth: {self.growth!r} (expected >= 1)")
        if self.max_gap is not None:
            _positive_int("max_gap", self.max_gap)
        _check_phase(self.phase)

    def gap(self, k: int) -> int:
        """Gap after the k-th event (k = 0 is the event at step 0; a ``phase`` > 0
        replaces that first gap, so staggered schedules differ only in their offset)."""
        if k == 0:
            first = self.phase or self.first
            return min(first, self.max_gap or first)
        if self.max_gap and k * math.log(self.growth) >= math.log(self.max_gap):
            return self.max_gap  # already capped; also avoids float overflow of growth ** k
        g = self.first + math.floor(self.growth ** k)
        return min(g, self.max_gap) if self.max_gap else g

    def due(self, state: dict, step: int) -> bool:
        nxt = state.get(f"{self.prefix}_next")
        return nxt is None or step >= nxt

    def after(self, state: dict, step: int, similarity: Optional[float] = None) -> None:
        k = state.get(f"{self.prefix}_count", 0)
        state[f"{self.prefix}_next"] = step + self.gap(k)
        state[f"{self.prefix}_count"] = k + 1
