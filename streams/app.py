"""Faust application of the sec-online worker: topics, the users table, agents and web pages.

Agents stay thin: they decode, call the domain code in ``sec_online`` and emit. A record that
fails to decode or validate, or that contradicts the user's state, goes to the dead-letter topic
with its reason and original bytes, and the agent goes on.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import faust

from sec_online import topics
from sec_online.clusters import VideoClusters, build_clusters
from sec_online.runtime import users_table_name
from sec_online.schemas import (
    InvalidRecord,
    Sample,
    decode_impression,
    decode_return,
    encode,
)
from sec_online.settings import Settings
from sec_online.userstate import APPLIED, StateConflict, UserStateMachine
from streams.broker_watch import BrokerWatch, install_repeat_filter
from streams.metrics import WorkerMetrics, count_levels
from streams.policy_follower import PolicyFollower
from streams.training import TrainerService

logger = logging.getLogger(__name__)

# Original bytes kept whole in a dead letter; a longer record keeps this prefix, its size and
# its SHA-256. The dead-letter topic accepts records of DEAD_LETTER_MAX_BYTES.
DEAD_LETTER_KEEP_BYTES = 1_048_576
DEAD_LETTER_MAX_BYTES = 8 * 1_048_576
# Record the users-per-level timeline every this many applied returns.
TIMELINE_EVERY_RETURNS = 200


@dataclass
class Worker:
    """The Faust app of one worker process and the domain objects its agents share."""

    settings: Settings
    app: faust.App
    users: Any
    machine: UserStateMachine
    clusters: VideoClusters
    metrics: WorkerMetrics
    policy: PolicyFollower
    trainer: TrainerService
    impressions_topic: Any
    returns_topic: Any
    samples_topic: Any
    dead_letters_topic: Any


def build_worker(settings: Settings) -> Worker:
    """Create the Faust app with its topics, table, agents, timers and pages."""
    # One folder per worker: RocksDB locks a table's folder, so two workers on one machine
    # must not share it. The web port tells local workers apart.
    datadir = settings.work_dir / "faust" / f"worker-{settings.web_port}"
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap.split(",")],
        store="rocksdb://",
        datadir=str(datadir),
        web_port=settings.web_port,
        # Faust forwards a page request for a user to the worker that owns the user's
        # partition, at the URL built from this host name and the port.
        web_host=settings.advertised_host,
        web_bind=settings.web_host,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        table_key_index_size=10_000,
        producer_acks=-1,
        # Dead letters carry the original record in base64, a third larger than the original.
        producer_max_request_size=DEAD_LETTER_MAX_BYTES,
    )
    worker = _assemble(settings, app)
    _register_event_agents(worker)
    _register_tasks(worker)
    _register_pages(worker)
    return worker


def _raw_topic(app: faust.App, name: str, partitions: int) -> Any:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
    )


def _assemble(settings: Settings, app: faust.App) -> Worker:
    clusters = build_clusters(settings)
    machine = UserStateMachine(settings.clusters, clusters.cluster_of, settings.score_decay)
    users = app.Table(
        users_table_name(settings),
        # Raw keys equal the Kafka keys of the source topics (the user id as decimal text), so
        # the table's partition for a user is the partition of that user's events.
        schema=faust.Schema(key_type=bytes, key_serializer="raw", value_serializer="json"),
        partitions=settings.partitions,
        options={"driver": "rocksdict"},
    )
    metrics = WorkerMetrics()
    policy = PolicyFollower(settings)
    trainer = TrainerService(settings, machine.n_features, metrics)
    return Worker(
        settings=settings,
        app=app,
        users=users,
        machine=machine,
        clusters=clusters,
        metrics=metrics,
        policy=policy,
        trainer=trainer,
        impressions_topic=_raw_topic(app, settings.topic(topics.IMPRESSIONS), settings.partitions),
        returns_topic=_raw_topic(app, settings.topic(topics.RETURNS), settings.partitions),
        samples_topic=_raw_topic(app, settings.topic(topics.SAMPLES), 1),
        dead_letters_topic=_raw_topic(app, settings.topic(topics.DEAD_LETTERS), 1),
    )


async def dead_letter(worker: Worker, event: Any, reason: str, message: str) -> None:
    """Send a record that could not be applied to the dead-letter topic, and count it."""
    meta = event.message
    value = meta.value or b""
    record = {
        "reason": reason,
        "message": message,
        "topic": meta.topic,
        "partition": meta.partition,
        "offset": meta.offset,
        "key_b64": base64.b64encode(meta.key or b"").decode(),
        "value_b64": base64.b64encode(value[:DEAD_LETTER_KEEP_BYTES]).decode(),
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "value_truncated": len(value) > DEAD_LETTER_KEEP_BYTES,
        "dead_lettered_ms": int(time.time() * 1000),
    }
    worker.metrics.dead_letters[reason] += 1
    logger.warning(
        "dead-lettered record topic=%s partition=%s offset=%s reason=%s: %s",
        meta.topic,
        meta.partition,
        meta.offset,
        reason,
        message,
    )
    await worker.dead_letters_topic.send(key=meta.key, value=json.dumps(record).encode())


async def _emit_samples(worker: Worker, samples: list[Sample]) -> None:
    for sample in samples:
        await worker.samples_topic.send(key=str(sample.user_id).encode(), value=encode(sample))
        worker.metrics.samples_emitted += 1


def _register_event_agents(worker: Worker) -> None:
    app, metrics = worker.app, worker.metrics

    @app.agent(worker.impressions_topic, name="impressions")
    async def impressions(stream: Any) -> None:
        async for event in stream.events():
            metrics.consumed["impressions"] += 1
            await _guarded(worker, event, _handle_impression)

    @app.agent(worker.returns_topic, name="returns")
    async def returns(stream: Any) -> None:
        async for event in stream.events():
            metrics.consumed["returns"] += 1
            await _guarded(worker, event, _handle_return)


async def _guarded(worker: Worker, event: Any, handler: Any) -> None:
    """Run a handler; an unexpected error dead-letters the record instead of stopping the agent."""
    try:
        await handler(worker, event)
    except Exception as exc:  # noqa: BLE001 - the record is kept on the dead-letter topic
        logger.exception(
            "failed to process record topic=%s partition=%s offset=%s",
            event.message.topic,
            event.message.partition,
            event.message.offset,
        )
        await dead_letter(worker, event, "processing_error", f"{type(exc).__name__}: {exc}")


async def _handle_impression(worker: Worker, event: Any) -> None:
    try:
        record = decode_impression(event.message.value)
        _check_key(event, record.user_id)
        key = event.message.key
        previous = worker.users.get(key)
        old_level = _level(previous)
        outcome = worker.machine.apply_impression(previous, record)
    except (InvalidRecord, StateConflict) as exc:
        await dead_letter(worker, event, exc.reason, exc.message)
        return
    _store(worker, key, previous is None, old_level, outcome.state)
    _count(worker.metrics, "impressions", outcome.status, record.time_ms)
    await _emit_samples(worker, outcome.samples)


async def _handle_return(worker: Worker, event: Any) -> None:
    boundaries, version = worker.policy.boundaries()
    try:
        record = decode_return(event.message.value)
        _check_key(event, record.user_id)
        key = event.message.key
        previous = worker.users.get(key)
        old_level = _level(previous)
        outcome = worker.machine.apply_return(previous, record, boundaries, version)
    except (InvalidRecord, StateConflict) as exc:
        await dead_letter(worker, event, exc.reason, exc.message)
        return
    _store(worker, key, previous is None, old_level, outcome.state)
    _count(worker.metrics, "returns", outcome.status, record.time_ms)
    applied = worker.metrics.applied["returns"]
    if outcome.status == APPLIED and applied % TIMELINE_EVERY_RETURNS == 0:
        worker.metrics.record_levels(record.time_ms)
    await _emit_samples(worker, outcome.samples)


def _check_key(event: Any, user_id: int) -> None:
    expected = str(user_id).encode()
    if event.message.key != expected:
        raise InvalidRecord(
            "wrong_key", f"record key {event.message.key!r} does not match user_id {user_id}"
        )


def _level(state: dict | None) -> int | None:
    # The state machine updates the stored dict in place, so read the level before applying.
    return None if state is None else state["level"]


def _store(worker: Worker, key: bytes, new_user: bool, old_level: int | None, state: dict) -> None:
    worker.users[key] = state
    # The dashboard shows which expert the selector picks for these recently active users.
    worker.metrics.touch_user(key)
    if new_user:
        worker.metrics.add_user(state["level"])
    else:
        worker.metrics.move_user(old_level, state["level"])


def _count(metrics: WorkerMetrics, kind: str, status: str, event_ms: int) -> None:
    if status == APPLIED:
        metrics.applied[kind] += 1
    else:
        metrics.duplicates[kind] += 1
    metrics.last_event_ms = max(metrics.last_event_ms, event_ms)


def _register_tasks(worker: Worker) -> None:
    app = worker.app

    @app.on_partitions_revoked.connect
    async def log_revoked(sender: Any, revoked: Any, **kwargs: Any) -> None:
        # Faust has paused consumption for the rebalance, and "rebalance complete" marks its end.
        for topic, partitions in _source_partitions(worker, revoked).items():
            logger.info("rebalance started topic=%s revoked_partitions=%s", topic, partitions)

    @app.on_rebalance_complete.connect
    async def recount_levels(sender: Any, **kwargs: Any) -> None:
        # Partitions came or went: count the users this worker now owns from its table.
        worker.metrics.reset_levels(count_levels(worker.users.items()))
        # Which worker owns which partitions is visible only in the logs: /stats/ counts events.
        assigned = _source_partitions(worker, app.consumer.assignment())
        for topic, partitions in assigned.items():
            logger.info("rebalance complete topic=%s partitions=%s", topic, partitions)

    @app.task
    async def train() -> None:
        try:
            await worker.trainer.run()
        finally:
            # Shutdown cancels this task, so the checkpoint store's RocksDB is closed here. An open
            # RocksDB's timer thread runs on while exit() destroys RocksDB's static objects, and
            # that crashed workers with SIGSEGV (rocksdict 0.3.29).
            worker.trainer.drop_trainer()

    # While the broker is down, one WARNING every few seconds replaces the Kafka clients' error
    # flood (see streams.broker_watch).
    install_repeat_filter()
    broker_watch = BrokerWatch(worker.settings.bootstrap)

    @app.task
    async def watch_broker() -> None:
        await broker_watch.run()

    @app.task
    async def follow_policy() -> None:
        await worker.policy.run()


def _source_partitions(worker: Worker, partitions: Any) -> dict[str, list[int]]:
    """Sorted partition numbers of the impressions and returns topics among ``partitions``."""
    names = [worker.settings.topic(topics.IMPRESSIONS), worker.settings.topic(topics.RETURNS)]
    return {name: sorted(tp.partition for tp in partitions if tp.topic == name) for name in names}


def _register_pages(worker: Worker) -> None:
    from streams.pages import register_pages

    register_pages(worker)
