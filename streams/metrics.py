"""Counters of one worker: JSON for ``/stats/`` and the dashboard, Prometheus text for ``/metrics``.

``WorkerMetrics`` contains the counts that the agents, the trainer and the pages update. The
Prometheus view does not keep counts of its own: at every scrape ``StatsCollector`` reads the same
snapshot that ``/stats/`` returns, so both pages always agree. Only the serving latency histogram
lives in the Prometheus registry, because a histogram has no JSON counterpart.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Points kept for the timelines; older points are dropped first.
TIMELINE_POINTS = 5_000
# Users whose state changed most recently, kept for the dashboard's expert selection shares.
RECENT_USERS = 256
# Selected levels of the most recent /recommend/ requests.
RECENT_RECOMMENDATIONS = 1_000
# Window over which the trainer's throughput is averaged, in seconds.
TRAINING_RATE_WINDOW_SECONDS = 30.0
# Upper bounds of the serving latency buckets, in seconds. On a busy 2-core machine, 40 requests
# to /recommend/ took 1 to 10 ms each (mean 5.6 ms), and a backlog of events delays them more.
LATENCY_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


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
    recommendations: Counter[str] = field(default_factory=Counter)
    recent_selections: deque[int] = field(
        default_factory=lambda: deque(maxlen=RECENT_RECOMMENDATIONS)
    )
    recent_users: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    # (time.monotonic(), samples) of each trained batch within the rate window.
    trained_batches: deque[tuple[float, int]] = field(default_factory=deque)
    started_monotonic: float = field(default_factory=time.monotonic)

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

    def touch_user(self, key: bytes) -> None:
        """Remember a user whose state just changed; keeps the RECENT_USERS most recent ones."""
        self.recent_users[key] = None
        self.recent_users.move_to_end(key)
        while len(self.recent_users) > RECENT_USERS:
            self.recent_users.popitem(last=False)

    def record_levels(self, event_ms: int) -> None:
        """Append the current users per level to the timeline, at an event time in ms.

        The point's time is the newest event time applied so far, not below ``event_ms``:
        partitions are read interleaved, so event times alone would make the timeline go back.
        """
        newest = max(event_ms, self.last_event_ms)
        self.level_timeline.append({"event_ms": newest, "levels": dict(self.users_per_level)})

    def record_loss(self, event_ms: int, step: int, loss: float) -> None:
        """Append one training loss to the timeline."""
        self.loss_timeline.append({"event_ms": event_ms, "step": step, "loss": loss})

    def record_trained(self, samples: int, now: float | None = None) -> None:
        """Count a batch of ``samples`` trained on, for ``samples_per_second``."""
        now = time.monotonic() if now is None else now
        self.trained_batches.append((now, samples))
        self._drop_old_batches(now)

    def samples_per_second(self, now: float | None = None) -> float:
        """Samples trained per second over the last TRAINING_RATE_WINDOW_SECONDS.

        The divisor is the window, or the process uptime while that is shorter, so the first
        batches after a start are not spread over time before the process existed.
        """
        now = time.monotonic() if now is None else now
        self._drop_old_batches(now)
        span = min(TRAINING_RATE_WINDOW_SECONDS, now - self.started_monotonic)
        if span <= 0:
            return 0.0
        return sum(samples for _, samples in self.trained_batches) / span

    def _drop_old_batches(self, now: float) -> None:
        while self.trained_batches and self.trained_batches[0][0] < now - (
            TRAINING_RATE_WINDOW_SECONDS
        ):
            self.trained_batches.popleft()

    def record_recommendation(self, level: int) -> None:
        """Count one served recommendation by the level of the expert the selector picked."""
        self.recommendations[str(level)] += 1
        self.recent_selections.append(level)

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
            "samples_trained_per_second": self.samples_per_second(),
            "users_per_level": dict(self.users_per_level),
            "recommendations": dict(self.recommendations),
            "recent_recommendations": dict(Counter(str(level) for level in self.recent_selections)),
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


def partition_lag(
    end_offset: int | None, committed: int | None, read: int | None
) -> dict[str, int | None]:
    """Position and lag of one partition, in records.

    Parameters
    ----------
    end_offset
        The partition's high watermark: the offset the next record written will get.
    committed
        The group's committed offset: the next record to process after a restart.
    read
        Offset of the last record the consumer fetched, or None before the first one.

    Returns
    -------
    dict
        ``end_offset``, ``position`` and ``lag``. The position is the committed offset, else
        the offset after the last one read. The lag is the end offset minus the position, never
        below 0, and None while either of them is unknown.
    """
    position = committed
    if position is None and read is not None:
        position = read + 1
    lag = None
    if end_offset is not None and position is not None:
        lag = max(0, end_offset - position)
    return {"end_offset": end_offset, "position": position, "lag": lag}


def consumer_lag(app: Any, topic_names: Iterable[str]) -> list[dict[str, Any]]:
    """Lag of the worker's Faust consumer on its assigned partitions of ``topic_names``.

    The end offset is the high watermark of the consumer's latest fetch response, so reading it
    costs no request to the broker. Committed and read offsets come from Faust's monitor.

    NOTE: a partition shows no lag until the consumer has fetched from it once and has read or
    committed an offset, which takes a few seconds after a start or a rebalance.
    """
    source_topics = set(topic_names)
    try:
        assignment = app.consumer.assignment()
    except Exception as exc:  # noqa: BLE001 - the consumer is not started yet or is rebalancing
        logger.debug("consumer assignment not available yet: %s", exc)
        return []
    monitor = app.monitor
    rows = []
    for tp in sorted(tp for tp in assignment if tp.topic in source_topics):
        row = partition_lag(
            _highwater(app, tp),
            monitor.tp_committed_offsets.get(tp),
            monitor.tp_read_offsets.get(tp),
        )
        rows.append({"topic": tp.topic, "partition": tp.partition, **row})
    return rows


def _highwater(app: Any, tp: Any) -> int | None:
    try:
        return app.consumer.highwater(tp)
    except Exception as exc:  # noqa: BLE001 - the partition was revoked since the assignment
        logger.debug("no high watermark for %s: %s", tp, exc)
        return None


class StatsCollector(Collector):
    """Prometheus metric families built from a ``/stats/`` snapshot at every scrape.

    Parameters
    ----------
    snapshot
        Returns the body of ``/stats/``: the keys of ``WorkerMetrics.as_dict`` plus ``trainer``,
        ``policy`` (with ``age_seconds``) and ``consumer_lag``.
    topic_of
        Maps an event kind (``impressions``, ``returns``) to its full topic name.
    """

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], topic_of: Callable[[str], str]
    ) -> None:
        self.snapshot = snapshot
        self.topic_of = topic_of

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family of the current snapshot."""
        stats = self.snapshot()
        yield from self._event_families(stats)
        yield from self._level_families(stats)
        yield from self._trainer_families(stats["trainer"])
        yield from self._policy_families(stats["policy"])
        yield from self._lag_families(stats["consumer_lag"])

    def _event_families(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        for key, name, text in (
            ("consumed", "sec_events_consumed", "Events read from a source topic."),
            ("applied", "sec_events_applied", "Events applied to the users table."),
            ("duplicates", "sec_duplicate_events", "Events skipped as already applied."),
        ):
            family = CounterMetricFamily(name, text, labels=["topic"])
            for kind, count in sorted(stats[key].items()):
                family.add_metric([self.topic_of(kind)], count)
            yield family
        dead = CounterMetricFamily(
            "sec_dead_letters", "Records sent to the dead-letter topic.", labels=["reason"]
        )
        for reason, count in sorted(stats["dead_letters"].items()):
            dead.add_metric([reason], count)
        yield dead
        yield CounterMetricFamily(
            "sec_samples_emitted",
            "Training samples sent to the samples topic, one per closed session.",
            value=stats["samples_emitted"],
        )

    def _level_families(self, stats: Mapping[str, Any]) -> Iterator[Metric]:
        users = GaugeMetricFamily(
            "sec_users",
            "Users in the partitions this worker owns, by retention level "
            "(unrated: no return with a gap yet).",
            labels=["level"],
        )
        for level, count in sorted(stats["users_per_level"].items()):
            users.add_metric([level], count)
        yield users
        bounds = GaugeMetricFamily(
            "sec_level_min_retention_score",
            "Lowest retention score of each level above 0, from the served policy version.",
            labels=["level"],
        )
        for index, boundary in enumerate(stats["policy"]["boundaries"]):
            bounds.add_metric([str(index + 1)], boundary)
        yield bounds
        served = CounterMetricFamily(
            "sec_recommendations",
            "Recommendations served, by the level of the expert the selector picked.",
            labels=["level"],
        )
        for level, count in sorted(stats["recommendations"].items()):
            served.add_metric([level], count)
        yield served

    def _trainer_families(self, trainer: Mapping[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sec_trainer_active",
            "1 when this worker owns the samples partition and trains, else 0.",
            value=1 if trainer["active"] else 0,
        )
        yield CounterMetricFamily(
            "sec_trainer_samples",
            "Samples read by this worker's trainer since it took the samples partition.",
            value=trainer["samples_consumed"],
        )
        yield GaugeMetricFamily(
            "sec_trainer_samples_per_second",
            "Samples trained per second, averaged over the last "
            f"{TRAINING_RATE_WINDOW_SECONDS:.0f} s.",
            value=trainer["samples_per_second"],
        )
        yield CounterMetricFamily(
            "sec_trainer_steps",
            "Optimizer steps of the model, restored with its checkpoint.",
            value=trainer["steps"],
        )
        loss = GaugeMetricFamily(
            "sec_trainer_loss",
            "Training loss of the latest mini-batch (behaviour cloning plus entropy term).",
        )
        if trainer["last_loss"] is not None:
            loss.add_metric([], trainer["last_loss"])
        yield loss
        yield GaugeMetricFamily(
            "sec_trainer_published_version",
            "Newest policy version this worker's trainer published.",
            value=trainer["version"],
        )

    def _policy_families(self, policy: Mapping[str, Any]) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sec_policy_version",
            "Policy version this worker serves (0: none received yet).",
            value=policy["version"],
        )
        age = GaugeMetricFamily(
            "sec_policy_age_seconds",
            "Seconds since the trainer created the served policy version.",
        )
        if policy["age_seconds"] is not None:
            age.add_metric([], policy["age_seconds"])
        yield age
        invalid = CounterMetricFamily(
            "sec_policy_invalid_updates",
            "Policy updates skipped because they failed to decode, verify or load, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(policy["invalid_update_reasons"].items()):
            invalid.add_metric([reason], count)
        yield invalid

    def _lag_families(self, rows: list[Mapping[str, Any]]) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "sec_consumer_lag_records",
            "Records in an assigned partition after the consumer's position.",
            labels=["topic", "partition"],
        )
        end = GaugeMetricFamily(
            "sec_consumer_end_offset",
            "High watermark of an assigned partition at the latest fetch.",
            labels=["topic", "partition"],
        )
        for row in rows:
            labels = [row["topic"], str(row["partition"])]
            if row["lag"] is not None:
                lag.add_metric(labels, row["lag"])
            if row["end_offset"] is not None:
                end.add_metric(labels, row["end_offset"])
        yield lag
        yield end


class PrometheusMetrics:
    """A worker's own Prometheus registry: the snapshot collector and the latency histogram.

    Each worker app gets its own ``CollectorRegistry``, not the process-wide default one, so
    several apps in one process (as in tests) never register a metric name twice.
    """

    def __init__(
        self, snapshot: Callable[[], Mapping[str, Any]], topic_of: Callable[[str], str]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(snapshot, topic_of))
        self.recommend_latency = Histogram(
            "sec_recommend_latency_seconds",
            "Time to serve a /recommend/ request on the worker that owns the user.",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=self.registry,
        )

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """Encode every metric for a scrape; returns the body and its content type.

        ``accept`` is the request's Accept header. The body is in the OpenMetrics format when the
        header requests it, else in the Prometheus text format.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
