"""In-process counters of one worker, served as JSON by the worker's ``/stats/`` page."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Points kept for the timelines; older points are dropped first.
TIMELINE_POINTS = 5_000


@dataclass
class WorkerMetrics:
    """Counts since this worker process started; a restart begins again from zero."""

    started_at: float = field(default_factory=time.time)
    consumed: Counter[str] = field(default_factory=Counter)
    applied: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    samples_emitted: int = 0
    users_per_level: Counter[str] = field(default_factory=Counter)
    level_timeline: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=TIMELINE_POINTS)
    )
    loss_timeline: deque[dict[str, Any]] = field(
        default_factory=lambda: deque(maxlen=TIMELINE_POINTS)
    )
    last_event_ms: int = 0

    def move_user(self, old_level: int | None, new_level: int | None) -> None:
        """Count a user's change of level; ``None`` is a user without a rated return yet."""
        if old_level == new_level:
            return
        self.users_per_level[_level_key(old_level)] -= 1
        self.users_per_level[_level_key(new_level)] += 1
        if self.users_per_level[_level_key(old_level)] == 0:
            del self.users_per_level[_level_key(old_level)]

    def reset_levels(self, counts: Counter[str]) -> None:
        """Replace the users per level, after a rebalance changed the partitions owned."""
        self.users_per_level = Counter(counts)

    def add_user(self, level: int | None) -> None:
        """Count a user seen for the first time."""
        self.users_per_level[_level_key(level)] += 1

    def record_levels(self, event_ms: int) -> None:
        """Append the current users per level to the timeline, at an event time in ms."""
        self.level_timeline.append({"event_ms": event_ms, "levels": dict(self.users_per_level)})

    def record_loss(self, event_ms: int, step: int, loss: float) -> None:
        """Append one training loss to the timeline."""
        self.loss_timeline.append({"event_ms": event_ms, "step": step, "loss": loss})

    def as_dict(self) -> dict[str, Any]:
        """JSON view of every counter."""
        return {
            "uptime_seconds": time.time() - self.started_at,
            "consumed": dict(self.consumed),
            "applied": dict(self.applied),
            "duplicates": dict(self.duplicates),
            "dead_letters": dict(self.dead_letters),
            "dead_letters_total": sum(self.dead_letters.values()),
            "samples_emitted": self.samples_emitted,
            "users_per_level": dict(self.users_per_level),
            "last_event_ms": self.last_event_ms,
            "level_timeline": list(self.level_timeline),
            "loss_timeline": list(self.loss_timeline),
        }


def _level_key(level: int | None) -> str:
    return "unrated" if level is None else str(level)


def count_levels(states: Iterable[tuple[Any, dict[str, Any]]]) -> Counter[str]:
    """Users per level key over ``(key, state)`` pairs, such as a table's items."""
    counts: Counter[str] = Counter()
    for _key, state in states:
        counts[_level_key(state["level"])] += 1
    return counts
