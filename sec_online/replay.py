"""Replay of a KuaiRand log to Kafka, as the live event stream that the workers consume.

The replay reads the log, keeps the rows in ``[start_ms, end_ms)`` and then the first ``limit``
of them, splits those rows into sessions and derives one return per session. The gap of a user's
first session comes from the user's last row before ``start_ms`` in the whole log, or from the
data folder's last-seen file. Events go out in time order: each impression to the
``impressions`` topic, and each return to the ``returns`` topic just before the first impression
of its session. Records are keyed by user id, so one user's events stay in order on one
partition of each topic.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from kafka import KafkaProducer
from kafka.errors import KafkaError, KafkaTimeoutError
from tqdm import tqdm

from sec_online.data import find_logs, read_last_seen, read_log
from sec_online.schemas import Impression, Return, encode, encode_key
from sec_online.sessions import assign_sessions, derive_returns, prior_activity_for
from sec_online.settings import Settings
from sec_online.topics import IMPRESSIONS, RETURNS

logger = logging.getLogger(__name__)

# Sends whose outcome is not yet checked. Beyond this the replay waits for the oldest one, which
# bounds memory and stops early on a broker that accepts nothing.
MAX_PENDING_SENDS = 20_000
# The producer retries a record with backoff until the broker acknowledges it or this many ms
# passed since the send, so the replay rides out a broker outage (or restart) shorter than this.
# Longer outages fail the replay with a ReplayError that names the first unacknowledged event.
DELIVERY_TIMEOUT_MS = 300_000
# While the oldest record waits for its acknowledgement longer than this, the replay logs a
# WARNING every STALL_WARNING_S seconds with the broker's reachability.
STALL_WARNING_S = 5.0
# Seconds beyond DELIVERY_TIMEOUT_MS that the replay waits for the producer to fail a record
# itself before it raises on its own.
DELIVERY_MARGIN_S = 30.0
CLOSE_TIMEOUT_S = 30.0
# Rows turned into records at a time while publishing.
CHUNK_ROWS = 20_000
# Impression fields and the log columns they come from.
IMPRESSION_COLUMNS = {
    "event_id": "event_id",
    "user_id": "user_id",
    "video_id": "video_id",
    "time_ms": "time_ms",
    "session_id": "session_id",
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "comment": "is_comment",
    "forward": "is_forward",
    "follow": "is_follow",
    "hate": "is_hate",
    "play_time_ms": "play_time_ms",
    "duration_ms": "duration_ms",
    "tab": "tab",
}


class ReplayError(RuntimeError):
    """Events could not be read from the log or published to Kafka."""


@dataclass(frozen=True)
class ReplayReport:
    """Summary of one replay; ``dataclasses.asdict`` gives plain JSON values.

    ``first_time_ms`` and ``last_time_ms`` are the event times of the first and last impression
    sent (Unix ms), ``None`` when nothing was sent. ``seconds`` is wall time of the publishing,
    and ``events_per_second`` counts impressions and returns together.
    """

    impressions: int
    returns: int
    users: int
    first_time_ms: int | None
    last_time_ms: int | None
    seconds: float
    events_per_second: float
    topics: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Report as a JSON-serialisable dict."""
        return asdict(self)


def load_slice(
    settings: Settings,
    paths: Sequence[Path] | None = None,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the rows to replay and derive their sessions and returns.

    Parameters
    ----------
    settings
        Run settings; the data folder gives the default logs and the last-seen file.
    paths
        Log files to read instead of the data folder's logs. Last-seen times come from the
        ``user_last_seen_*`` files next to the logs read, if any.
    start_ms, end_ms
        Keep rows with ``start_ms <= time_ms < end_ms`` (Unix ms), before ``limit`` applies.
    limit
        Keep only the first ``limit`` rows of the range.

    Returns
    -------
    tuple of pandas.DataFrame
        The kept log rows with ``session_id``, and their returns (see
        ``sec_online.sessions.derive_returns``).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    if paths is None:
        log_paths = find_logs(settings.require_data_dir())
    else:
        log_paths = [Path(path) for path in paths]
    full_log = read_log(log_paths)
    rows = full_log
    if start_ms is not None:
        rows = rows.loc[rows["time_ms"] >= start_ms]
    if end_ms is not None:
        rows = rows.loc[rows["time_ms"] < end_ms]
    if limit is not None:
        rows = rows.iloc[:limit]
    rows = assign_sessions(rows.reset_index(drop=True), settings)
    last_seen = _last_seen_near(log_paths)
    prior = prior_activity_for(full_log, start_ms, last_seen)
    return rows, derive_returns(rows, settings, prior)


def build_events(
    settings: Settings,
    paths: Sequence[Path] | None = None,
    *,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int | None = None,
) -> tuple[list[Impression], list[Return]]:
    """Build the impressions and returns that ``replay`` publishes, without Kafka.

    The arguments are those of ``load_slice``. Impressions are in time order, returns in the
    order of ``derive_returns``. ``iter_events`` gives both in publish order.
    """
    rows, returns = load_slice(settings, paths, start_ms=start_ms, end_ms=end_ms, limit=limit)
    return impressions_from(rows), returns_from(returns)


def impressions_from(rows: pd.DataFrame) -> list[Impression]:
    """Convert log rows with ``session_id`` to ``Impression`` records, in row order."""
    columns = [rows[column].tolist() for column in IMPRESSION_COLUMNS.values()]
    names = list(IMPRESSION_COLUMNS)
    rows_values = zip(*columns, strict=True)
    return [Impression(**dict(zip(names, values, strict=True))) for values in rows_values]


def returns_from(returns: pd.DataFrame) -> list[Return]:
    """Convert rows of ``derive_returns`` to ``Return`` records, in row order."""
    previous = _optional_ints(returns["previous_session_id"])
    gaps = _optional_ints(returns["gap_ms"])
    return [
        Return(
            event_id=event_id,
            user_id=user_id,
            time_ms=time_ms,
            session_id=session_id,
            previous_session_id=previous_id,
            previous_session_impressions=previous_rows,
            gap_ms=gap,
        )
        for event_id, user_id, time_ms, session_id, previous_id, previous_rows, gap in zip(
            returns["event_id"].tolist(),
            returns["user_id"].tolist(),
            returns["time_ms"].tolist(),
            returns["session_id"].tolist(),
            previous,
            returns["previous_session_impressions"].tolist(),
            gaps,
            strict=True,
        )
    ]


def iter_events(
    rows: pd.DataFrame, returns: pd.DataFrame, chunk_rows: int = CHUNK_ROWS
) -> Iterator[Impression | Return]:
    """Yield the events of ``load_slice`` frames in publish order.

    Impressions come in row order, and each session's return comes just before the session's
    first impression. Records are built ``chunk_rows`` rows at a time, so memory stays bounded
    by the frames whatever the log's length.

    Raises
    ------
    ReplayError
        When a session of ``rows`` has no return, or a return has no session in ``rows``.
    """
    keys = ["user_id", "session_id"]
    repeated = returns.duplicated(keys).to_numpy()
    if repeated.any():
        first = returns.iloc[int(repeated.argmax())]
        raise ReplayError(f"return {first['event_id']} appears more than once")
    starts = ~rows.duplicated(keys).to_numpy()
    session_keys = rows.loc[starts, keys].reset_index(drop=True)
    ordered = session_keys.merge(returns, on=keys, how="left")
    missing = ordered["event_id"].isna().to_numpy()
    if missing.any():
        first = session_keys.iloc[int(missing.argmax())]
        raise ReplayError(
            f"{int(missing.sum())} sessions have no return, the first is session "
            f"{first['session_id']} of user {first['user_id']}"
        )
    if len(returns) > len(ordered):
        raise ReplayError(
            f"{len(returns) - len(ordered)} returns have no impression: {len(returns)} returns "
            f"for {len(ordered)} sessions"
        )
    session_returns = _chunked_records(ordered, returns_from, chunk_rows)
    for offset in range(0, len(rows), chunk_rows):
        chunk = rows.iloc[offset : offset + chunk_rows]
        chunk_starts = starts[offset : offset + chunk_rows].tolist()
        for impression, starts_session in zip(impressions_from(chunk), chunk_starts, strict=True):
            if starts_session:
                yield next(session_returns)
            yield impression


def replay(
    settings: Settings,
    paths: Sequence[Path] | None = None,
    *,
    speed: float | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    producer_config: Mapping[str, Any] | None = None,
) -> ReplayReport:
    """Publish a log slice to the ``impressions`` and ``returns`` topics.

    Parameters
    ----------
    settings
        Run settings: bootstrap servers, topic prefix, data folder and session rule.
    paths, start_ms, end_ms, limit
        Rows to replay, as in ``load_slice``.
    speed
        ``None`` or 0 sends as fast as the broker accepts. A positive N paces the sends so wall
        time follows event time divided by N (N = 3600 replays an hour of the log per second).
    progress
        Show a tqdm progress bar over impressions when stderr is a terminal.
    producer_config
        ``KafkaProducer`` options that override the defaults of ``producer_settings``.

    Raises
    ------
    ReplayError
        When no broker responds, a topic does not exist, or a send fails. The message names
        the topic, the event and how many records were acknowledged before it.
    """
    if speed is not None and speed < 0:
        raise ValueError(f"speed must be None, 0 or positive, got {speed}")
    rows, returns = load_slice(settings, paths, start_ms=start_ms, end_ms=end_ms, limit=limit)
    topics = [settings.topic(IMPRESSIONS), settings.topic(RETURNS)]
    logger.info(
        "replay starting: impressions=%d returns=%d topics=%s bootstrap=%s speed=%s "
        "start_ms=%s end_ms=%s limit=%s",
        len(rows),
        len(returns),
        ",".join(topics),
        settings.bootstrap,
        speed or "max",
        start_ms,
        end_ms,
        limit,
    )
    started = time.monotonic()
    producer = _open_producer(settings, producer_config)
    try:
        _require_topics(producer, topics, settings)
        publisher = _Publisher(producer, settings.bootstrap)
        bar = tqdm(
            total=len(rows),
            unit="impression",
            disable=not progress or not sys.stderr.isatty(),
        )
        with bar:
            _publish_all(publisher, iter_events(rows, returns), topics, speed, bar)
        publisher.finish()
    finally:
        producer.close(timeout=CLOSE_TIMEOUT_S)
    report = _report(rows, len(returns), topics, time.monotonic() - started)
    logger.info(
        "replay finished: impressions=%d returns=%d users=%d seconds=%.1f events_per_second=%.0f",
        report.impressions,
        report.returns,
        report.users,
        report.seconds,
        report.events_per_second,
    )
    return report


def producer_settings(settings: Settings) -> dict[str, Any]:
    """Default ``KafkaProducer`` options of the replay.

    Every record needs all in-sync replicas (``acks="all"``). A failed send is retried every
    200 ms (kafka-python 3.0 has no growing retry backoff), and reconnects to a broker that is
    down back off from 200 ms to 5 s. There is no cap on the number of attempts, only
    ``DELIVERY_TIMEOUT_MS``, so a broker restart does not fail the replay. Idempotence keeps
    retries from writing duplicates or reordering a partition. Topics are never created on the
    fly, because the broker default partition count would break the co-partitioning of the
    user-keyed topics.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "client_id": f"{settings.app_id}-replay",
        "acks": "all",
        "retries": 2**31 - 1,
        "retry_backoff_ms": 200,
        "reconnect_backoff_ms": 200,
        "reconnect_backoff_max_ms": 5_000,
        "delivery_timeout_ms": DELIVERY_TIMEOUT_MS,
        "linger_ms": 20,
        "batch_size": 256 * 1024,
        "max_block_ms": 30_000,
        "allow_auto_create_topics": False,
    }
    if "enable_idempotence" in KafkaProducer.DEFAULT_CONFIG:
        config["enable_idempotence"] = True
    else:
        # Without idempotence, one request in flight is what keeps retried batches in order.
        config["max_in_flight_requests_per_connection"] = 1
    return config


class _Publisher:
    """Sends records and checks every send's outcome, oldest first.

    A send that blocks longer than the producer's ``max_block_ms`` (full buffer while the broker
    is down) is tried again, and a record without acknowledgement is waited for, until
    ``DELIVERY_TIMEOUT_MS`` plus a margin. Both log a WARNING every ``STALL_WARNING_S``.
    """

    def __init__(self, producer: KafkaProducer, bootstrap: str) -> None:
        self._producer = producer
        self._bootstrap = bootstrap
        # (future, topic, event id, monotonic time of the send)
        self._pending: deque[tuple[Any, str, str, float]] = deque()
        self._last_warning = 0.0
        self._warnings = 0
        self.acknowledged = 0

    def send(self, topic: str, event: Impression | Return) -> None:
        key, value = encode_key(event.user_id), encode(event)
        started = time.monotonic()
        while True:
            try:
                future = self._producer.send(topic, key=key, value=value)
                break
            except KafkaTimeoutError as exc:
                # The record was not appended, so sending it again cannot duplicate it.
                if time.monotonic() - started > _give_up_s():
                    raise self._error(topic, event.event_id, exc) from exc
                self._warn_stalled(f"sending event {event.event_id} blocked: {exc}", force=True)
            except KafkaError as exc:
                raise self._error(topic, event.event_id, exc) from exc
        self._pending.append((future, topic, event.event_id, time.monotonic()))
        self._check(block=len(self._pending) > MAX_PENDING_SENDS)
        if self._pending and time.monotonic() - self._pending[0][3] > STALL_WARNING_S:
            self._warn_stalled("records wait for their acknowledgement")

    def finish(self) -> None:
        # linger_ms sends the last batches, so waiting on each outcome needs no flush().
        while self._pending:
            self._check(block=True)

    def _check(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][0].is_done):
            future, topic, event_id, sent = self._pending[0]
            self._wait(future, topic, event_id, sent)
            self._pending.popleft()
            self.acknowledged += 1
            block = False

    def _wait(self, future: Any, topic: str, event_id: str, sent: float) -> None:
        """Wait for one record's outcome, logging a WARNING while the broker does not respond."""
        while True:
            try:
                future.get(timeout=STALL_WARNING_S)
                return
            except KafkaTimeoutError as exc:
                # get() raises the same error for its own timeout and for an expired delivery.
                if future.is_done or time.monotonic() - sent > _give_up_s():
                    raise self._error(topic, event_id, exc) from exc
                self._warn_stalled(f"event {event_id} to topic {topic} is not acknowledged")
            except KafkaError as exc:
                raise self._error(topic, event_id, exc) from exc

    def _warn_stalled(self, problem: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_warning < STALL_WARNING_S:
            return
        self._last_warning = now
        self._warnings += 1
        oldest = now - self._pending[0][3] if self._pending else 0.0
        state = "reachable" if _reachable(self._bootstrap) else "unreachable"
        logger.warning(
            "Kafka broker %s %s: %s; the producer retries the %d unacknowledged records with "
            "backoff until %d s after each send (oldest sent %.0f s ago, warning %d)",
            self._bootstrap,
            state,
            problem,
            len(self._pending),
            DELIVERY_TIMEOUT_MS // 1000,
            oldest,
            self._warnings,
        )

    def _error(self, topic: str, event_id: str, exc: Exception) -> ReplayError:
        return ReplayError(
            f"sending event {event_id} to topic {topic} failed after {self.acknowledged} "
            f"acknowledged records: {exc!r}. The producer retries for {DELIVERY_TIMEOUT_MS} ms; "
            "check that the broker runs and accepts writes"
        )


def _give_up_s() -> float:
    return DELIVERY_TIMEOUT_MS / 1000 + DELIVERY_MARGIN_S


def _reachable(bootstrap: str) -> bool:
    """Check whether any of the bootstrap servers accepts a TCP connection within a second."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return True
        except (OSError, ValueError):
            continue
    return False


def _publish_all(
    publisher: _Publisher,
    events: Iterable[Impression | Return],
    topics: list[str],
    speed: float | None,
    bar: tqdm,
) -> None:
    impressions_topic, returns_topic = topics
    origin: tuple[float, int] | None = None  # (wall clock s, event time ms) of the first event
    for event in events:
        if speed:
            origin = origin or (time.monotonic(), event.time_ms)
            _wait_until(origin, event.time_ms, speed)
        if isinstance(event, Impression):
            publisher.send(impressions_topic, event)
            bar.update(1)
        else:
            publisher.send(returns_topic, event)


def _wait_until(origin: tuple[float, int], time_ms: int, speed: float) -> None:
    wall_start, event_start = origin
    delay = wall_start + (time_ms - event_start) / 1000.0 / speed - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _open_producer(settings: Settings, overrides: Mapping[str, Any] | None) -> KafkaProducer:
    config = {**producer_settings(settings), **(overrides or {})}
    try:
        return KafkaProducer(**config)
    except KafkaError as exc:
        # kafka-python raises KafkaTimeoutError when no bootstrap server responds in time.
        raise ReplayError(
            f"cannot connect to Kafka at {config['bootstrap_servers']}: {exc}; start the broker "
            "or set SEC_BOOTSTRAP_SERVERS"
        ) from exc


def _require_topics(producer: KafkaProducer, topics: list[str], settings: Settings) -> None:
    for topic in topics:
        try:
            partitions = producer.partitions_for(topic)
        except KafkaTimeoutError as exc:
            raise ReplayError(
                f"topic {topic} not found on {settings.bootstrap}; create the topics first, "
                "for example with sec_online.runtime.create_topics, which the replay command "
                "runs"
            ) from exc
        if partitions is not None and len(partitions) != settings.partitions:
            logger.warning(
                "topic %s has %d partitions but SEC_PARTITIONS=%d; workers expect the same "
                "count on every user-keyed topic",
                topic,
                len(partitions),
                settings.partitions,
            )


def _report(rows: pd.DataFrame, returns: int, topics: list[str], seconds: float) -> ReplayReport:
    events = len(rows) + returns
    times = rows["time_ms"]
    return ReplayReport(
        impressions=len(rows),
        returns=returns,
        users=int(rows["user_id"].nunique()),
        first_time_ms=int(times.iloc[0]) if len(rows) else None,
        last_time_ms=int(times.iloc[-1]) if len(rows) else None,
        seconds=round(seconds, 3),
        events_per_second=round(events / seconds, 1) if seconds > 0 else 0.0,
        topics=topics,
    )


def _chunked_records(
    frame: pd.DataFrame, convert: Callable[[pd.DataFrame], list[Return]], chunk_rows: int
) -> Iterator[Return]:
    for offset in range(0, len(frame), chunk_rows):
        yield from convert(frame.iloc[offset : offset + chunk_rows])


def _last_seen_near(log_paths: Sequence[Path]) -> dict[int, int]:
    """Merge the last-seen files of the folders that hold the logs, latest time per user."""
    merged: dict[int, int] = {}
    for folder in sorted({Path(path).parent for path in log_paths}):
        for user_id, time_ms in read_last_seen(folder).items():
            merged[user_id] = max(time_ms, merged.get(user_id, time_ms))
    return merged


def _optional_ints(values: pd.Series) -> list[int | None]:
    return [None if pd.isna(value) else int(value) for value in values.tolist()]
