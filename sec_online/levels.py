"""Retention levels: boundaries over the retention score, estimated by streaming quantiles.

A user's retention score is in (0, 1], higher for users who return sooner. With K levels there
are K - 1 ascending boundaries; level k (0 = lowest retention, K - 1 = highest) contains the scores
that reach exactly k boundaries.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from river import stats


def level_of(score: float, boundaries: Sequence[float]) -> int:
    """Level of a retention score: the number of boundaries it reaches or exceeds."""
    return bisect.bisect_right(list(boundaries), score)


def even_boundaries(levels: int) -> list[float]:
    """Boundaries at j / K, used until the first streaming estimate is published."""
    return [j / levels for j in range(1, levels)]


class LevelBoundaries:
    """Streaming estimate of the K - 1 boundaries that split retention scores into K equal shares.

    Each boundary is a P-square quantile estimator from River (``river.stats.Quantile``), so
    memory stays constant however many scores arrive.
    """

    def __init__(self, levels: int) -> None:
        if levels < 1:
            raise ValueError(f"levels must be at least 1, got {levels}")
        self.levels = levels
        self._quantiles = [stats.Quantile(j / levels) for j in range(1, levels)]
        self.count = 0

    def update(self, score: float) -> None:
        """Add one retention score to the estimate."""
        for quantile in self._quantiles:
            quantile.update(score)
        self.count += 1

    def get(self) -> list[float]:
        """Current ascending boundaries; the even split until any score has arrived."""
        if self.count == 0:
            return even_boundaries(self.levels)
        values = [float(quantile.get()) for quantile in self._quantiles]
        # Separate estimators can cross on few scores; keep the boundaries ordered.
        for j in range(1, len(values)):
            values[j] = max(values[j], values[j - 1])
        return values

    def level_of(self, score: float) -> int:
        """Level of a score under the current boundaries."""
        return level_of(score, self.get())
