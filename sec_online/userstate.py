"""Per-user retention state, updated one event at a time.

The state of one user is a JSON-serialisable dict, stored by the worker in a RocksDB-backed table.
Impressions and returns arrive on two topics whose relative order is not guaranteed, so every
update here gives the same final state whatever the interleaving of the two topics, as long as
each topic keeps its own per-user order:

- An impression adds to the aggregates of its session (``session_id``), open until closed.
- A return opens its session and requests the close of the previous one. The close waits until that
  session has the number of impressions the return names, then folds the session into the
  user's history and emits a behaviour-cloning ``Sample``. Closes happen in session order.
- Sample features describe the user at the closed session's start: the history of earlier
  sessions and the retention score right after the return that opened the session.

Redelivered events are detected and not applied again: an impression by its ``event_id`` while
its session is open, and by its session once that session is closed (a closed session received
exactly the impressions its closing return counted); a return by its ``session_id``.

Rules for events that are valid on their own but do not fit the user's state:

- An impression that arrives after its session closed is counted in ``duplicates`` and not
  applied, whatever its ``event_id``. The closing return counted the session's impressions and
  all of them were applied, so a later one is a redelivery or a record the producer never
  counted.
- Each topic must keep a user's events in order, as Kafka does for a keyed producer. A return
  whose session is not after the user's latest return is counted in ``duplicates``, because the
  state keeps no return ids and so cannot tell a late return from a redelivery after a crash.
- An event more than ``MAX_AHEAD_MS`` after the latest event applied to the user is rejected
  with ``StateConflict("too_far_ahead")``. Without this bound one return dated 2099 would make
  every later real return of the user look like a duplicate. The bound is relative to the
  user's own event time, not the wall clock, because a replay publishes old event times. It
  does not apply to a user's first event, which only the schema's fixed range bounds, and it
  depends on how far the other topic was consumed, which matters only near the bound.
- A return that closes or opens a session at or before the user's latest closed session is
  rejected with ``StateConflict("conflicting_return")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sec_online.levels import level_of
from sec_online.schemas import FEEDBACK_SIGNALS, Impression, Return, Sample

STATE_FORMAT = 1
# Weight of the older history when a closed session is folded in (per session, not per day).
HISTORY_DECAY = 0.8
# Play time over duration is capped: a looped short video can reach ratios of 100 and more.
WATCH_RATIO_CAP = 3.0
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# Events later than this after the user's latest applied event are rejected. A year and a day is
# far longer than the one-month KuaiRand log, and still rejects clocks that are decades off.
MAX_AHEAD_MS = 366 * DAY_MS

APPLIED = "applied"
DUPLICATE = "duplicate"


class StateConflict(ValueError):
    """An event that contradicts the user's state, such as a second return closing one session.

    ``reason`` is a short code used as the dead-letter reason.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass
class Outcome:
    """Result of applying one event: the new state, whether it was applied, emitted samples."""

    state: dict[str, Any]
    status: str
    samples: list[Sample] = field(default_factory=list)


def watch_ratio(play_time_ms: int, duration_ms: int) -> float:
    """Play time over video duration, capped at ``WATCH_RATIO_CAP``; 0 for an unknown duration."""
    if duration_ms <= 0:
        return 0.0
    return min(play_time_ms / duration_ms, WATCH_RATIO_CAP)


def action_weight(impression: Impression) -> int:
    """Weight of a shown video in the session's action distribution.

    Every shown video counts 1, each positive engagement (long view, like, comment, forward,
    follow) adds 1, and a hate takes 1 away; the weight is never negative.
    """
    engagement = (
        impression.long_view
        + impression.like
        + impression.comment
        + impression.forward
        + impression.follow
    )
    return max(0, 1 + engagement - impression.hate)


def return_speed(gap_ms: int) -> float:
    """Map a return gap to (0, 1]: 1 for an instant return, 0.5 after one day."""
    return 1.0 / (1.0 + gap_ms / DAY_MS)


def _check_not_too_far_ahead(state: dict[str, Any], time_ms: int, event_id: str) -> None:
    latest = state.get("last_event_ms")
    if latest is not None and time_ms > latest + MAX_AHEAD_MS:
        raise StateConflict(
            "too_far_ahead",
            f"event {event_id} of user {state['user_id']} at time_ms={time_ms} is more than "
            f"{MAX_AHEAD_MS // DAY_MS} days after the user's latest event at {latest}",
        )


def _advance_event_time(state: dict[str, Any], time_ms: int) -> None:
    latest = state.get("last_event_ms")
    state["last_event_ms"] = time_ms if latest is None else max(latest, time_ms)


def feature_names(clusters: int) -> list[str]:
    """Names of the entries of the state feature vector, in order."""
    names = [f"rate_{name}" for name in FEEDBACK_SIGNALS]
    names += [
        "watch_ratio",
        "log_impressions_per_session",
        "log_closed_sessions",
        "retention_score",
        "log_gap_hours",
        "has_retention_score",
    ]
    names += [f"cluster_share_{c}" for c in range(clusters)]
    return names


class UserStateMachine:
    """Apply impressions and returns to user states and emit samples for closed sessions.

    ``cluster_of`` maps a video id to its cluster, or ``None`` for a video without features.
    """

    def __init__(
        self,
        clusters: int,
        cluster_of: Callable[[int], int | None],
        score_decay: float,
    ) -> None:
        self.clusters = clusters
        self.cluster_of = cluster_of
        self.score_decay = score_decay
        self.n_features = len(feature_names(clusters))

    def new_state(self, user_id: int) -> dict[str, Any]:
        """Empty state of a user never seen before."""
        return {
            "format": STATE_FORMAT,
            "user_id": user_id,
            "impressions": 0,
            "duplicates": 0,
            "unknown_videos": 0,
            "signal_totals": [0] * len(FEEDBACK_SIGNALS),
            "sessions": 0,
            "closed_sessions": 0,
            "returns": 0,
            "samples": 0,
            "empty_sessions": 0,
            "last_closed_session_id": None,
            "last_return_session_id": None,
            "last_gap_ms": None,
            "last_event_ms": None,
            "retention_score": None,
            "level": None,
            "boundaries_version": None,
            "history": {
                "impressions": 0.0,
                "sessions": 0.0,
                "signals": [0.0] * len(FEEDBACK_SIGNALS),
                "watch": 0.0,
                "clusters": [0.0] * self.clusters,
            },
            "open": {},
            "pending": [],
        }

    def apply_impression(self, state: dict[str, Any] | None, event: Impression) -> Outcome:
        """Add one impression to its session, then close any session now complete."""
        state = self._checked(state, event.user_id)
        closed_id = state["last_closed_session_id"]
        if closed_id is not None and event.session_id <= closed_id:
            state["duplicates"] += 1
            return Outcome(state, DUPLICATE)
        if event.event_id in state["open"].get(str(event.session_id), {}).get("event_ids", ()):
            state["duplicates"] += 1
            return Outcome(state, DUPLICATE)
        _check_not_too_far_ahead(state, event.time_ms, event.event_id)
        session = self._open_session(state, event.session_id)
        self._add_to_session(state, session, event)
        _advance_event_time(state, event.time_ms)
        return Outcome(state, APPLIED, self._close_ready(state))

    def apply_return(
        self,
        state: dict[str, Any] | None,
        event: Return,
        boundaries: Sequence[float],
        boundaries_version: int,
    ) -> Outcome:
        """Open the return's session, update the retention score and level, close what is due.

        ``boundaries`` are the current level boundaries and ``boundaries_version`` the policy
        version they come from (0 for the initial even split); both are recorded in the state.
        """
        state = self._checked(state, event.user_id)
        last = state["last_return_session_id"]
        if last is not None and event.session_id <= last:
            state["duplicates"] += 1
            return Outcome(state, DUPLICATE)
        self._check_closes_open_session(state, event)
        _check_not_too_far_ahead(state, event.time_ms, event.event_id)
        _advance_event_time(state, event.time_ms)
        state["returns"] += 1
        state["last_return_session_id"] = event.session_id
        if event.gap_ms is not None:
            self._rate_return(state, event.gap_ms, boundaries, boundaries_version)
        session = self._open_session(state, event.session_id)
        session["opening_score"] = state["retention_score"]
        session["opening_gap_ms"] = state["last_gap_ms"]
        if event.previous_session_id is not None:
            state["pending"].append(
                {
                    "session_id": event.previous_session_id,
                    "expected": event.previous_session_impressions,
                    "event_id": event.event_id,
                    "gap_ms": event.gap_ms,
                    "score": state["retention_score"],
                    "level": state["level"],
                }
            )
        return Outcome(state, APPLIED, self._close_ready(state))

    def features(self, state: dict[str, Any], session: dict[str, Any] | None = None) -> list[float]:
        """State feature vector (``feature_names`` order) at the start of ``session``.

        The history part covers the sessions closed so far. The retention part is taken from
        ``session`` when given (its values right after its opening return), else from the
        user's latest return.
        """
        history = state["history"]
        impressions = history["impressions"]
        rates = [value / impressions if impressions > 0 else 0.0 for value in history["signals"]]
        watch = history["watch"] / impressions if impressions > 0 else 0.0
        per_session = impressions / history["sessions"] if history["sessions"] > 0 else 0.0
        if session is None:
            score, gap_ms = state["retention_score"], state["last_gap_ms"]
        else:
            score, gap_ms = session.get("opening_score"), session.get("opening_gap_ms")
        shown = sum(history["clusters"])
        shares = [value / shown if shown > 0 else 0.0 for value in history["clusters"]]
        return [
            *rates,
            watch,
            math.log1p(per_session),
            math.log1p(state["closed_sessions"]),
            score if score is not None else 0.0,
            math.log1p(gap_ms / HOUR_MS) if gap_ms is not None else 0.0,
            1.0 if score is not None else 0.0,
            *shares,
        ]

    def historical_level(self, state: dict[str, Any] | None) -> int:
        """The user's level for serving: the stored level, 0 before the first rated return."""
        if state is None or state["level"] is None:
            return 0
        return int(state["level"])

    def _checked(self, state: dict[str, Any] | None, user_id: int) -> dict[str, Any]:
        if state is None:
            return self.new_state(user_id)
        if state.get("format") != STATE_FORMAT:
            raise StateConflict(
                "state_format",
                f"user {user_id} has state format {state.get('format')!r}, "
                f"this worker reads format {STATE_FORMAT}; replay the topics into fresh state",
            )
        return state

    def _open_session(self, state: dict[str, Any], session_id: int) -> dict[str, Any]:
        key = str(session_id)
        session = state["open"].get(key)
        if session is None:
            session = {
                "impressions": 0,
                "signals": [0] * len(FEEDBACK_SIGNALS),
                "watch": 0.0,
                "clusters": {},
                "actions": {},
                "last_ms": session_id,
                "event_ids": [],
            }
            state["open"][key] = session
            state["sessions"] += 1
        return session

    def _add_to_session(
        self, state: dict[str, Any], session: dict[str, Any], event: Impression
    ) -> None:
        signals = event.signals()
        state["impressions"] += 1
        state["signal_totals"] = [
            a + b for a, b in zip(state["signal_totals"], signals, strict=True)
        ]
        session["impressions"] += 1
        session["signals"] = [a + b for a, b in zip(session["signals"], signals, strict=True)]
        session["watch"] += watch_ratio(event.play_time_ms, event.duration_ms)
        session["last_ms"] = max(session["last_ms"], event.time_ms)
        session["event_ids"].append(event.event_id)
        cluster = self.cluster_of(event.video_id)
        if cluster is None:
            state["unknown_videos"] += 1
            return
        key = str(cluster)
        session["clusters"][key] = session["clusters"].get(key, 0) + 1
        weight = action_weight(event)
        if weight > 0:
            session["actions"][key] = session["actions"].get(key, 0) + weight

    def _check_closes_open_session(self, state: dict[str, Any], event: Return) -> None:
        previous = event.previous_session_id
        closed = state["last_closed_session_id"]
        if previous is not None and closed is not None and previous <= closed:
            raise StateConflict(
                "conflicting_return",
                f"return {event.event_id} closes session {previous} of user {event.user_id}, "
                f"but sessions up to {closed} are already closed",
            )
        if closed is not None and event.session_id <= closed:
            raise StateConflict(
                "conflicting_return",
                f"return {event.event_id} opens session {event.session_id} of user "
                f"{event.user_id}, which is not after the closed session {closed}",
            )

    def _rate_return(
        self,
        state: dict[str, Any],
        gap_ms: int,
        boundaries: Sequence[float],
        boundaries_version: int,
    ) -> None:
        speed = return_speed(gap_ms)
        score = state["retention_score"]
        if score is None:
            score = speed
        else:
            score = (1.0 - self.score_decay) * score + self.score_decay * speed
        state["retention_score"] = score
        state["last_gap_ms"] = gap_ms
        state["level"] = level_of(score, boundaries)
        state["boundaries_version"] = boundaries_version

    def _close_ready(self, state: dict[str, Any]) -> list[Sample]:
        samples = []
        while state["pending"]:
            request = state["pending"][0]
            key = str(request["session_id"])
            session = state["open"].get(key)
            applied = session["impressions"] if session is not None else 0
            if applied < request["expected"]:
                break
            state["pending"].pop(0)
            if session is None:
                session = self._open_session(state, request["session_id"])
            sample = self._close(state, request, session)
            if sample is not None:
                samples.append(sample)
        return samples

    def _close(
        self, state: dict[str, Any], request: dict[str, Any], session: dict[str, Any]
    ) -> Sample | None:
        features = self.features(state, session)
        actions = sorted(
            ([int(cluster), float(weight)] for cluster, weight in session["actions"].items()),
            key=lambda pair: pair[0],
        )
        self._fold(state["history"], session)
        del state["open"][str(request["session_id"])]
        state["closed_sessions"] += 1
        state["last_closed_session_id"] = request["session_id"]
        if not actions or request["gap_ms"] is None:
            state["empty_sessions"] += 1
            return None
        state["samples"] += 1
        return Sample(
            event_id=request["event_id"],
            user_id=state["user_id"],
            session_id=request["session_id"],
            time_ms=request["session_id"],
            features=features,
            actions=actions,
            level=request["level"] if request["level"] is not None else 0,
            retention_score=request["score"] if request["score"] is not None else 0.0,
            gap_ms=request["gap_ms"],
        )

    def _fold(self, history: dict[str, Any], session: dict[str, Any]) -> None:
        d = HISTORY_DECAY
        history["impressions"] = d * history["impressions"] + session["impressions"]
        history["sessions"] = d * history["sessions"] + 1.0
        history["watch"] = d * history["watch"] + session["watch"]
        history["signals"] = [
            d * old + new for old, new in zip(history["signals"], session["signals"], strict=True)
        ]
        counts = [0.0] * self.clusters
        for cluster, count in session["clusters"].items():
            counts[int(cluster)] = count
        history["clusters"] = [
            d * old + new for old, new in zip(history["clusters"], counts, strict=True)
        ]
