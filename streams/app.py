"""Faust application of the sec-online worker: topics, the users table, agents and web pages.

Agents take records in batches and hand them to ``streams.processing``, which decodes them,
applies them with the domain code in ``sec_online`` and emits samples. A record that fails to
decode or validate, or that contradicts the user's state, goes to the dead-letter topic with its
reason and original bytes, and the agent goes on.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import faust

from sec_online import topics
from sec_online.clusters import VideoClusters, build_clusters
from sec_online.runtime import users_table_name
from sec_online.settings import Settings
from sec_online.userstate import UserStateMachine
from streams.broker_watch import BrokerWatch, install_repeat_filter
from streams.metrics import WorkerMetrics, count_levels
from streams.policy_follower import PolicyFollower
from streams.processing import (
    DEAD_LETTER_MAX_BYTES,
    IMPRESSIONS,
    RETURNS,
    process_batch,
)
from streams.sample_producer import SampleProducer
from streams.training import TrainerService

logger = logging.getLogger(__name__)


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
    sample_producer: SampleProducer
    dead_letters_topic: Any
    # Both agents' batches read and write the same users: one batch at a time.
    batch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        sample_producer=SampleProducer(settings.bootstrap, settings.topic(topics.SAMPLES)),
        dead_letters_topic=_raw_topic(app, settings.topic(topics.DEAD_LETTERS), 1),
    )


def _register_event_agents(worker: Worker) -> None:
    app, settings = worker.app, worker.settings

    @app.agent(worker.impressions_topic, name="impressions")
    async def impressions(stream: Any) -> None:
        batches = stream.take_events(settings.events_per_batch, within=settings.batch_wait_seconds)
        async for events in batches:
            await process_batch(worker, IMPRESSIONS, events)

    @app.agent(worker.returns_topic, name="returns")
    async def returns(stream: Any) -> None:
        batches = stream.take_events(settings.events_per_batch, within=settings.batch_wait_seconds)
        async for events in batches:
            await process_batch(worker, RETURNS, events)


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

    @app.task
    async def close_sample_producer() -> None:
        # Shutdown cancels this task, and the sample producer is flushed and closed then.
        try:
            await asyncio.Event().wait()
        finally:
            await worker.sample_producer.stop()

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
