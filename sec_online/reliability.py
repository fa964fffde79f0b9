"""Fault scenarios that check that no event is lost and none is applied twice.

Each scenario replays a slice of the real log (every row of a few dozen users over the whole log)
through a worker process, injects one kind of fault, waits until the consumer group has committed
every published record, and compares each user's state, read from the users table's changelog
(``sec_online.statedump``), with the pandas ground truth of ``sec_online.reference``.

Scenarios:

- ``sigkill``: SIGKILL the worker three times at seeded points of the consumption, restarting it
  each time with the same settings and work folder.
- ``sigterm``: SIGTERM the worker at a seeded point of the consumption, then restart it.
- ``duplicates_and_garbage``: publish exact copies of some valid records and invalid records
  between the valid ones; copies must be counted as duplicates, invalid records dead-lettered.
- ``rocksdb_deleted``: SIGTERM the worker after half the events, delete its RocksDB table folder
  and restart it, so the table is rebuilt from the changelog topic alone.
- ``rebalance``: a second worker joins the group at a seeded point, the first leaves (SIGTERM)
  at a later one, and the second consumes the rest alone.
- ``broker_restart``: on a broker of its own, the scenario stops the broker at a seeded point of
  a ``sec-online replay`` for BROKER_OUTAGE_S seconds. Then it starts the broker again on the
  same ports and data folder, and the replay and the worker must retry until it is back.

Every scenario uses its own topics (``<prefix><scenario>.``), consumer group and work folder,
and deletes those of an earlier run of the same prefix when it starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from kafka import KafkaAdminClient, KafkaProducer

from sec_online import topics
from sec_online.broker import BrokerError, ManagedBroker
from sec_online.clusters import build_clusters
from sec_online.data import find_logs
from sec_online.kafka_admin import (
    committed_offsets,
    delete_topics,
    end_offsets,
    read_all,
)
from sec_online.reference import reference_user_state
from sec_online.replay import ReplayError, iter_events, load_slice, producer_settings, replay
from sec_online.runtime import changelog_topic, create_topics, users_table_name
from sec_online.schemas import Impression, encode, encode_key
from sec_online.settings import Settings
from sec_online.statedump import dump_states, last_values
from sec_online.workerproc import WorkerProcess, WorkerProcessError

logger = logging.getLogger(__name__)

SCENARIOS = (
    "sigkill",
    "sigterm",
    "duplicates_and_garbage",
    "rocksdb_deleted",
    "rebalance",
    "broker_restart",
    "bad_input_mix",
    "trainer_killed",
)
# Scenarios written in their own modules (sec_online.inputfaults, sec_online.trainerfaults).
# They return the summary fields as a dict instead of a ScenarioResult.
MODULE_SCENARIOS = ("bad_input_mix", "trainer_killed")
# Scenarios that stop the broker, so they start a broker of their own.
OWN_BROKER_SCENARIOS = ("broker_restart",)
DEFAULT_PREFIX = "reliability."
CLIENT_ID = "sec-online-reliability"
# Users of the slice have between these numbers of rows, so each has several sessions.
MIN_USER_ROWS = 30
MAX_USER_ROWS = 200
SIGKILL_COUNT = 3
# Faults hit between these fractions of the committed records, never at the very start or end.
FAULT_WINDOW = (0.1, 0.9)
# Every DUPLICATE_EVERY-th valid record, on average, is published twice.
DUPLICATE_EVERY = 25
POLL_S = 0.25
# Records per second of the paced publishing in the kill scenarios: slow enough that a fault
# point always falls while records are still arriving, whatever the worker's speed.
PACED_RATE = 150.0
# The changelog counts as settled when its end offsets did not move for this long. The worker
# flushes its producer at least once per commit interval (1 s).
SETTLE_S = 3.0
SEND_TIMEOUT_S = 60.0
# Seconds a restarted worker may take to consume again. After a SIGKILL the group's rebalance
# waits for the killed member's session to time out.
RESTART_TIMEOUT_S = 180.0
# Records per second of the rebalance scenario: slow enough (about 30 s for 1,900 records) that
# records still arrive during both rebalances.
REBALANCE_RATE = 60.0
# The second worker joins, and later the first leaves, between these fractions of the committed
# records.
JOIN_WINDOW = (0.1, 0.3)
LEAVE_WINDOW = (0.55, 0.8)
# Seconds the broker_restart scenario keeps its broker stopped, and the wall time over which its
# replay spreads the slice, so the outage falls in the middle of the replay.
BROKER_OUTAGE_S = 12.0
BROKER_REPLAY_S = 40.0
OUTAGE_WINDOW = (0.2, 0.5)
BROKER_START_TIMEOUT_S = 120.0
# Text log lines of the worker (sec_online.logs, and Faust's own) start with the local time,
# "2026-01-31 12:00:00,123", Faust's in brackets. JSON lines carry "time" in UTC instead.
TEXT_LOG_TIME = re.compile(r"^\[?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]?\s")
# The worker's own lines about rebalances (streams.app).
REBALANCE_MESSAGE = re.compile(
    r"rebalance (started|complete) topic=(\S+) (?:revoked_)?partitions=\[([\d, ]*)\]"
)
# Relative tolerance of the float fields: the worker folds one event at a time, the reference
# sums whole columns, so the two round differently.
REL_TOLERANCE = 1e-6
COUNT_FIELDS = (
    "impressions",
    "sessions",
    "closed_sessions",
    "returns",
    "last_gap_ms",
    "unknown_videos",
    "samples",
)


class ReliabilityError(RuntimeError):
    """A scenario could not run to its end: a worker died or did not catch up in time."""


@dataclass(frozen=True)
class Record:
    """One Kafka record to publish, already encoded."""

    topic: str
    key: bytes
    value: bytes


@dataclass(frozen=True)
class LogSlice:
    """Every event of the chosen users and the state each user must end in.

    ``events`` are ``(kind, key, value)`` with ``kind`` ``"impressions"`` or ``"returns"``, in
    publish order; ``expected`` maps user id to ``reference_user_state``'s dict.
    """

    user_ids: list[int]
    events: list[tuple[str, bytes, bytes]]
    expected: dict[int, dict[str, Any]]


@dataclass
class ScenarioResult:
    """Outcome of one scenario; ``dataclasses.asdict`` gives plain JSON values.

    ``published`` counts every record sent (copies and invalid ones included) and ``expected``
    the valid events of the slice. ``applied`` is the sum of ``impressions + returns`` over the
    dumped states. ``lost`` sums, per user, how far those counters fall short of the reference,
    and ``applied_twice`` how far they exceed it, so a loss for one user cannot hide a double
    application for another. ``recovery_seconds`` is the longest time from a restart until the
    web page responded and the worker consumed again, ``None`` without restarts.
    """

    name: str
    published: int = 0
    expected: int = 0
    applied: int = 0
    lost: int = 0
    applied_twice: int = 0
    users_over_reference: list[int] = field(default_factory=list)
    mismatching_users: dict[str, list[str]] = field(default_factory=dict)
    duplicates_published: int = 0
    duplicates_detected: int = 0
    dead_lettered: int = 0
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    expected_dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    recovery_seconds: float | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    passed: bool = False
    wall_seconds: float = 0.0

    def judge(self) -> None:
        """Fill ``failures`` with every broken expectation and set ``passed``."""
        failures = []
        if self.lost:
            failures.append(f"{self.lost} events lost")
        if self.applied_twice:
            failures.append(f"{self.applied_twice} events applied twice")
        if self.mismatching_users:
            failures.append(f"{len(self.mismatching_users)} users differ from the reference")
        if self.dead_letter_reasons != self.expected_dead_letter_reasons:
            failures.append(
                f"dead letters {self.dead_letter_reasons}, expected "
                f"{self.expected_dead_letter_reasons}"
            )
        if self.duplicates_published and self.duplicates_detected < self.duplicates_published:
            failures.append(
                f"{self.duplicates_detected} of {self.duplicates_published} copies detected"
            )
        served = self.checks.get("served_states_differing_from_changelog")
        if served:
            failures.append(f"served states of users {served} differ from the changelog")
        if self.checks.get("last_record_users_wrong"):
            failures.append(
                f"users {self.checks['last_record_users_wrong']} of the last changelog records "
                "are wrong after recovery"
            )
        records = self.checks.get("records_in_source_topics")
        if records is not None and records != self.published:
            failures.append(f"{records} records in the source topics, {self.published} published")
        idle = self.checks.get("workers_without_partitions")
        if idle:
            failures.append(f"workers {idle} never owned a partition")
        in_table = self.checks.get("users_in_table")
        if in_table is not None and in_table != self.checks.get("users_in_reference"):
            failures.append(f"{in_table} users in the rebuilt table, expected all of them")
        self.failures = failures
        self.passed = not failures


@dataclass(frozen=True)
class ReliabilityConfig:
    """Options of a reliability run: scenarios, slice size, seed, topic prefix and limits.

    ``web_ports`` gives one HTTP port per scenario in ``scenarios`` order; when empty, each
    scenario picks a free port on 127.0.0.1.
    """

    scenarios: tuple[str, ...] = SCENARIOS
    users: int = 30
    seed: int = 0
    prefix: str = DEFAULT_PREFIX
    timeout_s: float = 600.0
    web_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.scenarios) - set(SCENARIOS))
        if unknown:
            raise ValueError(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
        if self.web_ports and len(self.web_ports) != len(self.scenarios):
            raise ValueError(
                f"{len(self.web_ports)} web ports for {len(self.scenarios)} scenarios; give "
                "one port per scenario or none"
            )
        if self.users < 1:
            raise ValueError(f"users must be at least 1, got {self.users}")


# The log slice and its ground truth.
def choose_users(log_path: Path, count: int) -> list[int]:
    """Pick the ``count`` lowest user ids with MIN_USER_ROWS to MAX_USER_ROWS rows in the log."""
    users = pd.read_csv(log_path, usecols=["user_id"])["user_id"]
    per_user = users.value_counts()
    eligible = per_user[(per_user >= MIN_USER_ROWS) & (per_user <= MAX_USER_ROWS)]
    chosen = sorted(int(user) for user in eligible.index)[:count]
    if len(chosen) < count:
        raise ReliabilityError(
            f"{log_path} has only {len(chosen)} users with {MIN_USER_ROWS} to {MAX_USER_ROWS} "
            f"rows, {count} requested; lower the number of users"
        )
    return chosen


def build_slice(settings: Settings, users: int) -> LogSlice:
    """Read every row of ``users`` users, derive their events and their reference states.

    The rows are written to a temporary CSV so that ``load_slice`` derives sessions and
    returns exactly as ``sec-online replay`` does for a log file.
    """
    log_path = find_logs(settings.require_data_dir())[0]
    user_ids = choose_users(log_path, users)
    log = pd.read_csv(log_path)
    with tempfile.TemporaryDirectory(prefix="sec-online-slice-") as folder:
        path = Path(folder) / "log_standard_slice.csv.gz"
        log[log["user_id"].isin(user_ids)].to_csv(path, index=False)
        rows, returns = load_slice(settings, [path])
    expected = reference_user_state(rows, returns, build_clusters(settings), settings)
    events = [
        (
            topics.IMPRESSIONS if isinstance(event, Impression) else topics.RETURNS,
            encode_key(event.user_id),
            encode(event),
        )
        for event in iter_events(rows, returns)
    ]
    logger.info(
        "reliability slice users=%d impressions=%d returns=%d",
        len(user_ids),
        len(rows),
        len(returns),
    )
    return LogSlice(user_ids=user_ids, events=events, expected=expected)


# Comparison with the reference.
def compare_state(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Names of the fields where a dumped state differs from its reference state."""
    wrong = [name for name in COUNT_FIELDS if got.get(name) != want[name]]
    if got.get("signal_totals") != list(want["signal_totals"]):
        wrong.append("signal_totals")
    if not _close(got.get("retention_score"), want["retention_score"], 1e-9):
        wrong.append("retention_score")
    history = got.get("history", {})
    for name in ("impressions", "watch"):
        if not _close(history.get(name), want[f"history_{name}"], REL_TOLERANCE):
            wrong.append(f"history_{name}")
    signals = history.get("signals") or []
    wanted = list(want["history_signals"])
    if len(signals) != len(wanted) or not all(
        _close(a, b, REL_TOLERANCE) for a, b in zip(signals, wanted, strict=False)
    ):
        wrong.append("history_signals")
    if list(got.get("open", {})) != [str(want["open_session_id"])]:
        wrong.append("open_session_id")
    return wrong


def _close(got: float | None, want: float | None, rel: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-12)


def score_states(
    result: ScenarioResult, states: list[dict[str, Any]], expected: dict[int, dict[str, Any]]
) -> None:
    """Fill the counts and mismatches of ``result`` from dumped states and reference states."""
    by_user = {int(state["user_id"]): state for state in states}
    result.expected = sum(want["impressions"] + want["returns"] for want in expected.values())
    result.applied = sum(state["impressions"] + state["returns"] for state in states)
    result.duplicates_detected = sum(state.get("duplicates", 0) for state in states)
    lost = twice = 0
    for user_id in sorted(set(by_user) | set(expected)):
        got, want = by_user.get(user_id), expected.get(user_id)
        if want is None:
            twice += got["impressions"] + got["returns"]
            result.users_over_reference.append(user_id)
            result.mismatching_users[str(user_id)] = ["not_in_reference"]
            continue
        if got is None:
            lost += want["impressions"] + want["returns"]
            result.mismatching_users[str(user_id)] = ["missing_from_dump"]
            continue
        excess = [got[name] - want[name] for name in ("impressions", "returns")]
        lost += sum(-value for value in excess if value < 0)
        twice += sum(value for value in excess if value > 0)
        if any(value > 0 for value in excess):
            result.users_over_reference.append(user_id)
        wrong = compare_state(got, want)
        if wrong:
            result.mismatching_users[str(user_id)] = wrong
    result.lost, result.applied_twice = lost, twice


# Kafka and worker plumbing.
def scenario_settings(base: Settings, prefix: str, name: str, web_port: int) -> Settings:
    """Settings of one scenario: own topics, consumer group, work folder and web port."""
    scenario_prefix = f"{prefix}{name}."
    return dataclasses.replace(
        base,
        topic_prefix=scenario_prefix,
        # A new group per run: committed offsets of an earlier run must not leak in.
        app_id=f"{scenario_prefix}app-{os.getpid()}-{int(time.time())}",
        work_dir=base.work_dir / "reliability" / name,
        web_port=web_port,
        publish_every_seconds=1.0,
    )


def reset_scenario(
    settings: Settings, clusters_cache: Path | None, keep: Path | None = None
) -> None:
    """Delete the scenario's topics and work folder of an earlier run, then create the topics.

    ``keep`` is a folder directly under the work folder that stays, such as a running broker's.
    """
    delete_stale_topics(settings)
    reset_work_dir(settings.work_dir, keep)
    if clusters_cache is not None and clusters_cache.is_dir():
        shutil.copytree(clusters_cache, settings.work_dir / "clusters")
    create_topics(settings)


def reset_work_dir(work_dir: Path, keep: Path | None = None) -> None:
    """Empty ``work_dir`` except ``keep``, creating it when missing."""
    work_dir.mkdir(parents=True, exist_ok=True)
    for path in work_dir.iterdir():
        if path == keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def delete_stale_topics(settings: Settings) -> None:
    """Delete the topics of an earlier run with the scenario's topic prefix."""
    admin = KafkaAdminClient(
        bootstrap_servers=settings.bootstrap, client_id="sec-online-reliability"
    )
    try:
        stale = sorted(
            name for name in admin.list_topics() if name.startswith(settings.topic_prefix)
        )
    finally:
        admin.close()
    if stale:
        logger.info("deleting topics of an earlier run: %s", ", ".join(stale))
        delete_topics(settings.bootstrap, stale)


def publish(settings: Settings, records: Iterable[Record]) -> int:
    """Send records in order and wait until every one is acknowledged; returns the count."""
    producer = KafkaProducer(**producer_settings(settings))
    futures = []
    try:
        for record in records:
            futures.append(producer.send(record.topic, key=record.key, value=record.value))
        producer.flush(timeout=SEND_TIMEOUT_S)
        for future in futures:
            future.get(timeout=SEND_TIMEOUT_S)
    finally:
        producer.close(timeout=SEND_TIMEOUT_S)
    return len(futures)


class PacedPublisher:
    """Publish records in a background thread at about ``rate`` records per second.

    Publishing goes on only while ``gate`` is set. The kill scenarios clear it while the worker
    is down, so the records left at each fault point are still unpublished, and every fault
    hits a worker that has records to consume.
    """

    def __init__(self, settings: Settings, records: Sequence[Record], rate: float) -> None:
        self.settings = settings
        self.records = list(records)
        self.rate = rate
        self.sent = 0
        self.error: BaseException | None = None
        self.gate = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-publisher", daemon=True)

    def start(self) -> PacedPublisher:
        self.gate.set()
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> int:
        """Wait until every record is acknowledged; returns the number sent."""
        self.gate.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise ReliabilityError(
                f"publishing {len(self.records)} records took over {timeout_s:.0f} s "
                f"({self.sent} sent)"
            )
        if self.error is not None:
            raise ReliabilityError(f"publishing failed: {self.error}") from self.error
        return self.sent

    def _run(self) -> None:
        try:
            producer = KafkaProducer(**producer_settings(self.settings))
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
            return
        batch = max(1, int(self.rate / 10))  # ten batches a second
        try:
            for offset in range(0, len(self.records), batch):
                self.gate.wait()
                for record in self.records[offset : offset + batch]:
                    producer.send(record.topic, key=record.key, value=record.value)
                    self.sent += 1
                time.sleep(batch / self.rate)
            producer.flush(timeout=SEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            producer.close(timeout=SEND_TIMEOUT_S)


def as_records(settings: Settings, events: Iterable[tuple[str, bytes, bytes]]) -> list[Record]:
    """Turn slice events into records for the scenario's topics."""
    return [Record(settings.topic(kind), key, value) for kind, key, value in events]


def source_topics(settings: Settings) -> list[str]:
    """The topics the worker's event agents consume."""
    return [settings.topic(topics.IMPRESSIONS), settings.topic(topics.RETURNS)]


def consumption(settings: Settings) -> tuple[int, int, list[str]]:
    """Committed and end offsets summed over the source topics, and the partitions behind."""
    committed_total = end_total = 0
    behind = []
    for topic in source_topics(settings):
        ends = end_offsets(settings.bootstrap, topic)
        committed = committed_offsets(settings.bootstrap, settings.app_id, topic)
        for partition, end in sorted(ends.items()):
            done = committed.get(partition, 0)
            committed_total += done
            end_total += end
            if done < end:
                behind.append(f"{topic}[{partition}] committed {done} of {end}")
    return committed_total, end_total, behind


def wait_caught_up(settings: Settings, worker: WorkerProcess, timeout_s: float) -> None:
    """Wait until the group committed every source record and the changelog stopped growing.

    Raises
    ------
    ReliabilityError
        On timeout, listing the partitions whose committed offset is behind the end offset.
    """
    deadline = time.monotonic() + timeout_s
    behind: list[str] = ["not checked yet"]
    while time.monotonic() < deadline:
        worker.check_alive("consuming the scenario's records")
        _, _, behind = consumption(settings)
        if not behind:
            _wait_changelog_settled(settings, deadline)
            return
        time.sleep(POLL_S)
    raise ReliabilityError(
        f"the worker did not commit every record within {timeout_s:.0f} s: {'; '.join(behind)}; "
        f"see {worker.log_file}"
    )


def _wait_changelog_settled(settings: Settings, deadline: float) -> None:
    topic = changelog_topic(settings)
    previous, since = end_offsets(settings.bootstrap, topic), time.monotonic()
    while time.monotonic() - since < SETTLE_S:
        if time.monotonic() > deadline:
            raise ReliabilityError(f"changelog {topic} still growing at the timeout")
        time.sleep(POLL_S)
        current = end_offsets(settings.bootstrap, topic)
        if current != previous:
            previous, since = current, time.monotonic()


def start_worker(settings: Settings, log_name: str) -> tuple[WorkerProcess, float]:
    """Start a worker and wait until it answers and consumes; returns it and the seconds taken.

    The worker counts as consuming once its ``/stats/`` shows a consumed record, or at once when
    the group has nothing left to consume.
    """
    started = time.monotonic()
    worker = WorkerProcess(settings, settings.work_dir / log_name).start()
    worker.wait_healthy()
    while True:
        worker.check_alive("recovering")
        stats = worker.get("/stats/")
        if sum(stats["consumed"].values()) > 0:
            break
        if not consumption(settings)[2]:
            break
        if time.monotonic() - started > RESTART_TIMEOUT_S:
            raise ReliabilityError(
                f"the worker responded but consumed nothing within {RESTART_TIMEOUT_S:.0f} "
                f"s; see {worker.log_file}"
            )
        time.sleep(POLL_S)
    return worker, round(time.monotonic() - started, 2)


def kill(worker: WorkerProcess, signum: int, timeout_s: float = 60.0) -> int | None:
    """Send ``signum`` to the worker's process group and wait for it to exit; returns its code."""
    process = worker.process
    if process is None or process.poll() is not None:
        return None if process is None else process.returncode
    os.killpg(process.pid, signum)
    return process.wait(timeout=timeout_s)


def wait_progress(settings: Settings, worker: WorkerProcess, fraction: float, total: int) -> float:
    """Wait until the group committed ``fraction`` of ``total`` records; returns the share."""
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        worker.check_alive("waiting for the fault point")
        committed, _, _ = consumption(settings)
        if committed / total >= fraction:
            return committed / total
        time.sleep(POLL_S)
    raise ReliabilityError(f"consumption did not reach {fraction:.0%}; see {worker.log_file}")


def dead_letter_reasons(settings: Settings) -> Counter[str]:
    """Count the dead letters of the scenario by reason."""
    records = read_all(settings.bootstrap, settings.topic(topics.DEAD_LETTERS))
    return Counter(json.loads(record.value)["reason"] for record in records)


# Invalid records.
def garbage_records(settings: Settings, events: Sequence[tuple[str, bytes, bytes]]) -> list[Record]:
    """Invalid variants of the slice's first impression and first return, one per defect.

    The records keep the real user's key, so they reach the partitions that hold the user.
    ``expected_garbage_reasons`` lists the dead-letter reason of each, in the same order.
    """
    impression_key, impression = _first(events, topics.IMPRESSIONS)
    return_key, returned = _first(events, topics.RETURNS)
    impressions = settings.topic(topics.IMPRESSIONS)
    returns = settings.topic(topics.RETURNS)
    records = [Record(impressions, impression_key, value) for value in _bad_impressions(impression)]
    records += [Record(returns, return_key, value) for value in _bad_returns(returned)]
    return records


def expected_garbage_reasons() -> list[str]:
    """Dead-letter reasons of ``garbage_records``, in the same order."""
    return [
        "undecodable",
        "not_object",
        "missing_field",
        "unexpected_field",
        "wrong_type",
        "out_of_range",
        "out_of_range",
        "unknown_schema",
        "wrong_type",
        "unknown_schema",
    ]


def _first(events: Sequence[tuple[str, bytes, bytes]], kind: str) -> tuple[bytes, dict]:
    for event_kind, key, value in events:
        if event_kind == kind:
            return key, json.loads(value)
    raise ReliabilityError(f"the slice has no {kind}")


def _bad_impressions(valid: dict[str, Any]) -> list[bytes]:
    far_future = 4_200_000_000_000  # year 2103, after the schema's latest plausible time
    variants: list[Any] = [
        b"\xff\xfe{not json",
        json.dumps([valid]).encode(),
        _json({key: value for key, value in valid.items() if key != "tab"}),
        _json({**valid, "region": "unknown"}),
        _json({**valid, "video_id": str(valid["video_id"])}),
        _json({**valid, "time_ms": -valid["time_ms"]}),
        _json({**valid, "time_ms": far_future}),
        _json({**valid, "schema": "impression/99"}),
    ]
    return variants


def _bad_returns(valid: dict[str, Any]) -> list[bytes]:
    return [
        _json({**valid, "previous_session_impressions": 1.5}),
        _json({**valid, "schema": "return/0"}),
    ]


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def with_duplicates_and_garbage(
    settings: Settings, events: Sequence[tuple[str, bytes, bytes]], seed: int
) -> tuple[list[Record], int, int]:
    """Interleave exact copies of seeded valid records and the invalid records with the events.

    A copy follows its original after a seeded number of other records, so some copies arrive
    while the session is open and some after the next return closed it. Invalid records are
    spread evenly. Returns the records, the number of copies and the number of invalid records.
    """
    rng = random.Random(seed)
    valid = as_records(settings, events)
    garbage = garbage_records(settings, events)
    spacing = max(1, len(valid) // (len(garbage) + 1))
    pending: dict[int, list[Record]] = {}
    records: list[Record] = []
    copies = 0
    for index, record in enumerate(valid):
        records.append(record)
        records.extend(pending.pop(index, []))
        if rng.randrange(DUPLICATE_EVERY) == 0:
            pending.setdefault(index + rng.randrange(0, 40), []).append(record)
            copies += 1
        if index % spacing == spacing - 1 and garbage:
            records.append(garbage.pop(0))
    for later in pending.values():
        records.extend(later)
    records.extend(garbage)
    return records, copies, len(garbage_records(settings, events))


# Scenarios.
class ScenarioRun:
    """The state shared by the steps of one scenario: settings, slice, result and workers.

    ``worker`` is the worker whose state and pages the scenario checks at its end; ``workers``
    lists every worker started, so ``close`` stops them all. ``broker`` is the scenario's own
    broker, ``None`` when it runs on the given cluster.
    """

    def __init__(
        self,
        settings: Settings,
        log_slice: LogSlice,
        name: str,
        timeout_s: float,
        broker: ManagedBroker | None = None,
    ):
        self.settings = settings
        self.slice = log_slice
        self.result = ScenarioResult(name=name)
        self.timeout_s = timeout_s
        self.broker = broker
        self.worker: WorkerProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.starts = 0
        self.started = time.monotonic()

    def publish(self, records: Sequence[Record]) -> None:
        self.result.published += publish(self.settings, records)

    def start(self, after: str | None = None) -> WorkerProcess:
        """Start (or restart after a fault named ``after``) the worker, timing a restart."""
        self.starts += 1
        worker, seconds = start_worker(self.settings, f"worker-{self.starts}.log")
        self.worker = worker
        self.workers.append(worker)
        if after is not None:
            self.result.restarts.append({"after": after, "recovery_seconds": seconds})
        return worker

    def current(self) -> WorkerProcess:
        if self.worker is None:
            raise ReliabilityError("no worker started")
        return self.worker

    def finish(self, expected_reasons: Iterable[str] = ()) -> ScenarioResult:
        """Wait for the worker to commit everything, dump and score the states."""
        worker = self.current()
        wait_caught_up(self.settings, worker, self.timeout_s)
        states = dump_states(self.settings)
        score_states(self.result, states, self.slice.expected)
        reasons = dead_letter_reasons(self.settings)
        self.result.dead_letter_reasons = dict(sorted(reasons.items()))
        self.result.dead_lettered = sum(reasons.values())
        self.result.expected_dead_letter_reasons = dict(sorted(Counter(expected_reasons).items()))
        served = served_mismatches(worker, states)
        self.result.checks["served_states_differing_from_changelog"] = served
        # The producers are idempotent and not transactional, so the end offsets count the
        # records: a retried send written twice shows as more records than published.
        self.result.checks["records_in_source_topics"] = sum(
            sum(end_offsets(self.settings.bootstrap, topic).values())
            for topic in source_topics(self.settings)
        )
        times = [restart["recovery_seconds"] for restart in self.result.restarts]
        self.result.recovery_seconds = max(times) if times else None
        return self.result

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.result.wall_seconds = round(time.monotonic() - self.started, 1)


def served_mismatches(worker: WorkerProcess, states: list[dict[str, Any]]) -> list[int]:
    """Users whose state served by the worker's ``/users/`` page differs from the changelog's."""
    differing = []
    for state in states:
        try:
            served = worker.get(f"/users/{state['user_id']}/")
        except urllib.error.HTTPError:
            served = None
        if served != state:
            differing.append(int(state["user_id"]))
    return differing


def run_kills(run: ScenarioRun, rng: random.Random, signum: int, count: int) -> None:
    """Send ``signum`` to the worker at ``count`` seeded points of the consumption.

    Records are published at PACED_RATE while the worker runs, so each fault hits a worker
    with records still to consume. Every restart uses the same settings and work folder.
    """
    records = as_records(run.settings, run.slice.events)
    points = sorted(rng.uniform(*FAULT_WINDOW) for _ in range(count))
    run.start()
    publisher = PacedPublisher(run.settings, records, PACED_RATE).start()
    name = signal.Signals(signum).name
    codes = []
    for point in points:
        reached = wait_progress(run.settings, run.current(), point, len(records))
        publisher.gate.clear()
        codes.append(kill(run.current(), signum))
        logger.info("sent %s to the worker at %.1f%% committed", name, reached * 100)
        run.start(after=f"{name} at {reached:.1%} committed")
        publisher.gate.set()
    run.result.published = publisher.join(len(records) / PACED_RATE + RESTART_TIMEOUT_S)
    run.result.checks["exit_codes"] = codes
    run.finish()


def run_sigkill(run: ScenarioRun, rng: random.Random) -> None:
    """SIGKILL the worker SIGKILL_COUNT times during the consumption, restarting it each time."""
    run_kills(run, rng, signal.SIGKILL, SIGKILL_COUNT)


def run_sigterm(run: ScenarioRun, rng: random.Random) -> None:
    """SIGTERM the worker once during the consumption, restart it and finish."""
    run_kills(run, rng, signal.SIGTERM, 1)


def run_duplicates_and_garbage(run: ScenarioRun, rng: random.Random) -> None:
    """Publish copies of valid records and invalid records among the events."""
    records, copies, _ = with_duplicates_and_garbage(
        run.settings, run.slice.events, rng.randrange(2**31)
    )
    run.result.duplicates_published = copies
    run.start()
    run.publish(records)
    run.finish(expected_garbage_reasons())


def run_rocksdb_deleted(run: ScenarioRun, rng: random.Random) -> None:
    """Stop the worker after half the events, delete its table folder, restart it, finish.

    The second half is published before the restart, so the restarted worker rebuilds the
    table from the changelog, then applies the rest to the rebuilt states. A changelog record
    that recovery skipped shows as a state that differs from the reference, or, for a user
    without later events, as a served state that differs from the changelog's.
    """
    records = as_records(run.settings, run.slice.events)
    half = len(records) // 2
    run.publish(records[:half])
    worker = run.start()
    wait_caught_up(run.settings, worker, run.timeout_s)
    before = last_changelog_records(run.settings)
    run.result.checks["sigterm_exit_code"] = kill(worker, signal.SIGTERM)
    run.result.checks["deleted_folders"] = [
        str(path) for path in delete_table_folders(run.settings)
    ]
    run.result.checks["users_in_changelog_at_stop"] = before["users"]
    run.publish(records[half:])
    run.start(after="SIGTERM and deletion of the RocksDB table folder")
    run.finish()
    _check_last_records(run, before)


def last_changelog_records(settings: Settings) -> dict[str, Any]:
    """Users in the changelog and the user of each partition's last record."""
    records = read_all(settings.bootstrap, changelog_topic(settings))
    last: dict[int, int] = {}
    for record in records:
        last[record.partition] = int(record.key)
    latest = last_values((record.key, record.value) for record in records)
    return {"users": len(latest), "last_record_users": sorted(set(last.values()))}


def _check_last_records(run: ScenarioRun, before: dict[str, Any]) -> None:
    served_wrong = set(run.result.checks["served_states_differing_from_changelog"])
    users = before["last_record_users"]
    run.result.checks["last_record_users"] = users
    run.result.checks["last_record_users_wrong"] = sorted(
        user for user in users if user in served_wrong or str(user) in run.result.mismatching_users
    )
    stats = run.current().get("/stats/?exact=1", timeout_s=120.0)
    run.result.checks["users_in_table"] = stats["table"]["users"]
    run.result.checks["users_in_reference"] = len(run.slice.expected)


def delete_table_folders(settings: Settings) -> list[Path]:
    """Delete the users table's RocksDB folders of the worker; returns what was deleted.

    Faust keeps them under ``<work_dir>/faust/worker-<web port>/``, one folder per partition,
    named after the table.

    Raises
    ------
    ReliabilityError
        When no folder of the users table is found, which means the layout changed.
    """
    root = settings.work_dir / "faust" / f"worker-{settings.web_port}"
    pattern = f"{users_table_name(settings)}-*.db"
    folders = sorted(path for path in root.rglob(pattern) if path.is_dir())
    if not folders:
        raise ReliabilityError(f"no RocksDB folder of the users table under {root}")
    for folder in folders:
        shutil.rmtree(folder)
    return folders


@dataclass(frozen=True)
class RebalanceLine:
    """One of the worker's log lines about a rebalance of the impressions topic.

    ``time_s`` is the line's Unix time (from the local time that Faust logs, to the ms).
    ``kind`` is ``"started"`` (with the partitions revoked) or ``"complete"`` (with the
    partitions the worker consumes from then on).
    """

    time_s: float
    kind: str
    partitions: tuple[int, ...]


def rebalance_lines(log_file: Path, topic: str) -> list[RebalanceLine]:
    """Read the rebalance lines of ``topic`` from a worker's log, in order (none without a log)."""
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines():
        parsed = _time_and_message(line)
        found = REBALANCE_MESSAGE.search(parsed[1]) if parsed else None
        if parsed is None or found is None or found.group(2) != topic:
            continue
        numbers = tuple(int(number) for number in found.group(3).split(",") if number.strip())
        lines.append(RebalanceLine(parsed[0], found.group(1), numbers))
    return lines


def _time_and_message(line: str) -> tuple[float, str] | None:
    """Unix time and message of a text or JSON log line; ``None`` for other lines."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
            stamp = datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        except (ValueError, KeyError, TypeError):
            return None
        return stamp.replace(tzinfo=UTC).timestamp(), str(record.get("message", ""))
    match = TEXT_LOG_TIME.match(line)
    if match is None:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp(), line[match.end() :]


def wait_rebalanced(
    settings: Settings, workers: Sequence[WorkerProcess], since_s: float, timeout_s: float
) -> float:
    """Wait until ``workers`` together consume every partition after a rebalance.

    Each worker must have logged "rebalance complete" after ``since_s`` (Unix time), and the
    partitions of their latest such lines must cover the impressions topic once.

    Returns
    -------
    float
        Unix time of the last of those lines, when the last worker resumed consumption.
    """
    topic = settings.topic(topics.IMPRESSIONS)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = []
        for worker in workers:
            worker.check_alive("waiting for the rebalance")
            done = [
                line
                for line in rebalance_lines(worker.log_file, topic)
                if line.kind == "complete" and line.time_s >= since_s
            ]
            latest.append(done[-1] if done else None)
        owned = sorted(p for line in latest if line is not None for p in line.partitions)
        if None not in latest and owned == list(range(settings.partitions)):
            return max(line.time_s for line in latest if line is not None)
        time.sleep(POLL_S)
    logs = ", ".join(str(worker.log_file) for worker in workers)
    raise ReliabilityError(
        f"the workers did not share the {settings.partitions} partitions of {topic} within "
        f"{timeout_s:.0f} s after the rebalance; see {logs}"
    )


def pause_start(workers: Sequence[WorkerProcess], topic: str, since_s: float) -> float:
    """Return the first time after ``since_s`` that a worker's log shows it revoking partitions.

    A joining worker logs "rebalance started" too, but it revokes nothing and its line comes
    while the others still consume, so only lines with revoked partitions count.
    """
    starts = [
        line.time_s
        for worker in workers
        for line in rebalance_lines(worker.log_file, topic)
        if line.kind == "started" and line.partitions and line.time_s >= since_s
    ]
    return min(starts, default=since_s)


def owned_partitions(worker: WorkerProcess, topic: str) -> list[int]:
    """Return every partition of ``topic`` that the worker's log shows it consumed at some point."""
    lines = rebalance_lines(worker.log_file, topic)
    return sorted({p for line in lines if line.kind == "complete" for p in line.partitions})


def second_worker(run: ScenarioRun) -> Settings:
    """Settings of a second worker in the group: own web port and work folder."""
    settings = dataclasses.replace(
        run.settings, web_port=_free_port(), work_dir=run.settings.work_dir / "second-worker"
    )
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    clusters = run.settings.work_dir / "clusters"
    if clusters.is_dir():
        shutil.copytree(clusters, settings.work_dir / "clusters")
    return settings


def run_rebalance(run: ScenarioRun, rng: random.Random) -> None:
    """Let a second worker join mid-replay, then stop the first; the second finishes alone.

    Each rebalance's ``recovery_seconds`` runs from the moment consumption paused until every
    partition was consumed again, from the workers' "rebalance started" and "rebalance
    complete" lines. Consumption pauses at the first worker's revocation when the second
    joins, and at the SIGTERM when the first leaves, since it stops consuming at once.
    """
    records = as_records(run.settings, run.slice.events)
    topic = run.settings.topic(topics.IMPRESSIONS)
    join_at, leave_at = rng.uniform(*JOIN_WINDOW), rng.uniform(*LEAVE_WINDOW)
    first = run.start()
    publisher = PacedPublisher(run.settings, records, REBALANCE_RATE).start()
    reached = wait_progress(run.settings, first, join_at, len(records))
    joined = time.time()
    # Records wait while the second worker imports its libraries (tens of seconds on a busy
    # machine), so that it joins the group while most of the replay is still to come.
    publisher.gate.clear()
    settings = second_worker(run)
    second = WorkerProcess(settings, settings.work_dir / "worker-second.log").start()
    run.workers.append(second)
    second.wait_healthy()
    publisher.gate.set()
    resumed = wait_rebalanced(run.settings, [first, second], joined, RESTART_TIMEOUT_S)
    paused = pause_start([first, second], topic, joined)
    run.result.restarts.append(
        {
            "after": f"second worker joined at {reached:.1%} committed",
            "recovery_seconds": round(resumed - paused, 2),
        }
    )
    reached = wait_progress(run.settings, second, max(leave_at, reached), len(records))
    first.check_alive("waiting for the leave point")
    left = time.time()
    run.result.checks["exit_codes"] = [kill(first, signal.SIGTERM)]
    run.worker = second
    resumed = wait_rebalanced(run.settings, [second], left, RESTART_TIMEOUT_S)
    run.result.restarts.append(
        {
            "after": f"first worker left (SIGTERM) at {reached:.1%} committed",
            "recovery_seconds": round(resumed - left, 2),
        }
    )
    run.result.published = publisher.join(len(records) / REBALANCE_RATE + RESTART_TIMEOUT_S)
    owned = {"first": owned_partitions(first, topic), "second": owned_partitions(second, topic)}
    run.result.checks["partitions_owned"] = owned
    idle = [name for name, partitions in owned.items() if not partitions]
    run.result.checks["workers_without_partitions"] = idle
    run.finish()


def run_broker_restart(run: ScenarioRun, rng: random.Random) -> None:
    """Stop the scenario's broker mid-replay for BROKER_OUTAGE_S, then start it again.

    The events go out through ``sec_online.replay.replay`` (the code of ``sec-online replay``)
    in a thread, paced to last about BROKER_REPLAY_S. ``recovery_seconds`` runs from the
    broker's start until the worker's ``/stats/`` counts a record consumed after the outage.
    """
    broker = run.broker
    if broker is None:
        raise ReliabilityError("the broker_restart scenario needs a broker of its own")
    worker = run.start()
    replayer = BackgroundReplay(run.settings, run.slice, BROKER_REPLAY_S).start()
    point = rng.uniform(*OUTAGE_WINDOW)
    reached = wait_progress(run.settings, worker, point, len(run.slice.events))
    broker.stop()
    logger.info("stopped the broker at %.1f%% committed for %.0f s", reached * 100, BROKER_OUTAGE_S)
    time.sleep(BROKER_OUTAGE_S)
    worker.check_alive("the broker was down")
    consumed = sum(worker.get("/stats/")["consumed"].values())
    started = time.monotonic()
    broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    broker_ready = time.monotonic() - started
    recovery = wait_consumed_beyond(worker, consumed, started, RESTART_TIMEOUT_S)
    run.result.restarts.append(
        {
            "after": f"broker stopped {BROKER_OUTAGE_S:.0f} s at {reached:.1%} committed",
            "recovery_seconds": recovery,
            "broker_start_seconds": round(broker_ready, 2),
        }
    )
    report = replayer.join(run.timeout_s)
    run.result.published = report["impressions"] + report["returns"]
    run.result.checks["replay_warnings"] = replayer.warnings
    run.finish()


def wait_consumed_beyond(
    worker: WorkerProcess, consumed: int, started: float, timeout_s: float
) -> float:
    """Wait until the worker's consumed count exceeds ``consumed``; seconds since ``started``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.check_alive("reconnecting to the broker")
        try:
            now = sum(worker.get("/stats/")["consumed"].values())
        except (urllib.error.URLError, TimeoutError) as exc:
            logger.info("worker page not available yet: %s", exc)
            now = consumed
        if now > consumed:
            return round(time.monotonic() - started, 2)
        time.sleep(POLL_S)
    raise ReliabilityError(
        f"the worker consumed nothing within {timeout_s:.0f} s of the broker's restart; see "
        f"{worker.log_file}"
    )


class BackgroundReplay:
    """``sec_online.replay.replay`` of the slice's rows in a thread, paced to ``seconds``.

    The slice's rows are written to a CSV in the work folder, the same rows from which
    ``build_slice`` derived its events, so the replay publishes exactly those events.
    ``warnings`` collects the replay's WARNING messages.
    """

    def __init__(self, settings: Settings, log_slice: LogSlice, seconds: float) -> None:
        self.settings = settings
        self.path = write_slice_log(settings, log_slice.user_ids)
        times = [json.loads(value)["time_ms"] for _, _, value in log_slice.events]
        self.speed = max(1.0, (max(times) - min(times)) / 1000.0 / seconds)
        self.report: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self._thread = threading.Thread(target=self._run, name="background-replay", daemon=True)

    def start(self) -> BackgroundReplay:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the replay's end; returns its report as a dict."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise ReliabilityError(f"the replay did not finish within {timeout_s:.0f} s")
        if self.error is not None or self.report is None:
            raise ReliabilityError(f"the replay failed: {self.error}") from self.error
        return self.report

    def _run(self) -> None:
        capture = _WarningCapture(self.warnings)
        replay_logger = logging.getLogger("sec_online.replay")
        replay_logger.addHandler(capture)
        try:
            report = replay(self.settings, [self.path], speed=self.speed, progress=False)
            self.report = report.to_dict()
        except Exception as exc:  # noqa: BLE001 - reported by join()
            self.error = exc
        finally:
            replay_logger.removeHandler(capture)


class _WarningCapture(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def write_slice_log(settings: Settings, user_ids: Sequence[int]) -> Path:
    """Write every log row of ``user_ids`` to ``<work_dir>/log_standard_slice.csv.gz``."""
    log_path = find_logs(settings.require_data_dir())[0]
    log = pd.read_csv(log_path)
    path = settings.work_dir / "log_standard_slice.csv.gz"
    log[log["user_id"].isin(user_ids)].to_csv(path, index=False)
    return path


SCENARIO_STEPS: dict[str, Callable[[ScenarioRun, random.Random], None]] = {
    "sigkill": run_sigkill,
    "sigterm": run_sigterm,
    "duplicates_and_garbage": run_duplicates_and_garbage,
    "rocksdb_deleted": run_rocksdb_deleted,
    "rebalance": run_rebalance,
    "broker_restart": run_broker_restart,
}


def run_scenario(
    base: Settings,
    log_slice: LogSlice,
    name: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    seed: int = 0,
    web_port: int | None = None,
    timeout_s: float = 600.0,
) -> ScenarioResult:
    """Run one scenario on its own topics and work folder and return its result.

    Scenarios of OWN_BROKER_SCENARIOS run on a broker that they start on free ports of
    127.0.0.1, with its folder under the scenario's work folder, and stop at their end.
    """
    settings = scenario_settings(base, prefix, name, web_port or _free_port())
    rng = random.Random(f"{seed}-{name}")
    with contextlib.ExitStack() as stack:
        broker = None
        if name in OWN_BROKER_SCENARIOS:
            broker = stack.enter_context(scenario_broker(settings))
            settings = dataclasses.replace(settings, bootstrap_servers=broker.bootstrap)
        reset_scenario(settings, base.work_dir / "clusters", keep=broker and broker.home)
        run = ScenarioRun(settings, log_slice, name, timeout_s, broker)
        logger.info(
            "scenario starting name=%s topics=%s* seed=%d", name, settings.topic_prefix, seed
        )
        try:
            SCENARIO_STEPS[name](run, rng)
        except (WorkerProcessError, BrokerError, ReplayError) as exc:
            raise ReliabilityError(f"scenario {name}: {exc}") from exc
        finally:
            run.close()
    run.result.judge()
    logger.info("scenario finished %s", json.dumps(dataclasses.asdict(run.result)))
    return run.result


@contextlib.contextmanager
def scenario_broker(settings: Settings) -> Iterator[ManagedBroker]:
    """Start a broker of the scenario on free ports, with its folder in the work folder.

    The work folder of an earlier run is emptied first. A broker of that run still running in
    it is an error, because its data folder would be deleted under it.

    Raises
    ------
    ReliabilityError
        When the broker of an earlier run still runs in the scenario's folder.
    """
    home = settings.work_dir / "broker"
    broker_port, controller_port = _free_ports(2)
    broker_settings = dataclasses.replace(
        settings, bootstrap_servers="", broker_port=broker_port, controller_port=controller_port
    )
    broker = ManagedBroker(broker_settings, home=home)
    earlier = broker.status()
    if earlier.running:
        raise ReliabilityError(
            f"a broker of an earlier run still runs in {home} (pid {earlier.pid}); stop it "
            f"with `kill {earlier.pid}` and run the scenario again"
        )
    reset_work_dir(settings.work_dir)
    broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    try:
        yield broker
    finally:
        broker.stop()


def run_reliability(settings: Settings, config: ReliabilityConfig) -> dict[str, Any]:
    """Run the configured scenarios and write ``<reports_dir>/reliability/summary.json``."""
    build_clusters(settings)  # once, cached in settings.work_dir; scenarios copy the cache
    log_slice = build_slice(settings, config.users)
    ports = config.web_ports or (None,) * len(config.scenarios)
    summary: dict[str, Any] = {"users": len(log_slice.user_ids), "seed": config.seed}
    summary["scenarios"] = {}
    for name, port in zip(config.scenarios, ports, strict=True):
        if name in MODULE_SCENARIOS:
            outcome = run_module_scenario(settings, log_slice, name, config, port or _free_port())
            summary["scenarios"][name] = outcome
            continue
        result = run_scenario(
            settings,
            log_slice,
            name,
            prefix=config.prefix,
            seed=config.seed,
            web_port=port,
            timeout_s=config.timeout_s,
        )
        summary["scenarios"][name] = dataclasses.asdict(result)
    path = settings.reports_dir / "reliability" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["summary_file"] = str(path)
    return summary


def run_module_scenario(
    settings: Settings, log_slice: LogSlice, name: str, config: ReliabilityConfig, web_port: int
) -> dict[str, Any]:
    """Run ``bad_input_mix`` or ``trainer_killed`` and return its summary fields.

    ``passed`` and ``failures`` are lifted from the scenario's details, so every scenario of
    the summary has them at the top level.
    """
    # Imported here because both modules import this one.
    from sec_online.inputfaults import run_bad_input_mix
    from sec_online.trainerfaults import run_trainer_killed

    started = time.monotonic()
    if name == "bad_input_mix":
        outcome = run_bad_input_mix(
            settings, log_slice, config.prefix, config.seed, web_port, config.timeout_s
        )
    else:
        outcome = run_trainer_killed(
            settings, config.prefix, config.seed, web_port, config.timeout_s
        )
    details = outcome.get("details", {})
    outcome["failures"] = list(details.get("failures", []))
    outcome["passed"] = bool(details.get("passed", not outcome["failures"]))
    outcome["wall_seconds"] = time.monotonic() - started
    return outcome


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 at the time of the call."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
