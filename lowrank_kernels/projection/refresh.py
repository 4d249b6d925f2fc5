"""When a projection is recomputed ("refreshed").

Both policies refresh at the first step, then whenever ``gap`` steps have passed since the last
refresh: with the step counted before its increment, as galore-torch does, refreshes fall at
steps 0, T, 2T, … for a fixed gap T.

:class:`LazyRefresh` adapts the gap (Q-GaLore's idea, with a sound measure). At each refresh it
measures how far the subspace moved with the sign- and rotation-invariant overlap

    overlap = ‖P_oldᵀ P_new‖²_F / r   ∈ [0, 1]   (1: same subspace; r/d: unrelated random ones)

(for DCT indices: the fraction of indices kept). If ``overlap >= threshold`` the subspace is
stable and the gap grows: ``gap ← min(ceil(gap·growth), max_gap)``; otherwise the gap returns to
its initial value, so a subspace that starts moving again is tracked closely. (q-galore-torch
instead averages the signed cosine of the top singular vector over its last 5 refreshes, which a
sign flip of that one vector turns negative, and never shortens the gap again.)
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class FixedGap:
    """Refresh every ``gap`` steps (galore-torch's ``update_proj_gap``)."""

    gap: int
    measures_overlap = False

    def __post_init__(self):
        if not isinstance(self.gap, int) or self.gap < 1:
            raise ValueError(f"update_proj_gap: expected an int >= 1, got {self.gap!r}")

    def next_gap(self, gap: int, overlap: float) -> int:
        return gap


@dataclasses.dataclass(frozen=True)
class LazyRefresh:
    """Refresh after ``gap`` steps, growing the gap while the subspace stays put (see module doc)."""

    gap: int
    threshold: float = 0.8
    growth: float = 2.0
    max_gap: int | None = None
    measures_overlap = True

    def __post_init__(self):
        FixedGap(self.gap)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"refresh_threshold: expected a value in (0, 1], got {self.threshold}")
        if not self.growth >= 1.0:
            raise ValueError(f"refresh_growth: expected a value >= 1, got {self.growth}")
        if self.max_gap is not None and self.max_gap < self.gap:
            raise ValueError(f"refresh_max_gap: expected None or >= update_proj_gap={self.gap}, "
                             f"got {self.max_gap}")

    def next_gap(self, gap: int, overlap: float) -> int:
        if overlap < self.threshold:
            return self.gap
        grown = math.ceil(gap * self.growth)
        return grown if self.max_gap is None else min(grown, self.max_gap)


REFRESH_POLICIES = ("fixed", "lazy")


def make_refresh_policy(refresh: str, gap: int, *, threshold: float = 0.8, growth: float = 2.0,
                        max_gap: int | None = None) -> FixedGap | LazyRefresh:
    if refresh == "fixed":
        return FixedGap(gap)
    if refresh == "lazy":
        return LazyRefresh(gap, threshold, growth, max_gap)
    raise ValueError(f"refresh: expected one of {REFRESH_POLICIES}, got {refresh!r}")
