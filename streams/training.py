"""Continuous fine-tuning of the SEC experts, inside whichever worker owns the samples topic.

The samples topic has one partition, read by a consumer group of its own (``<app id>-trainer``),
so exactly one worker trains at a time. It has its own consumer, apart from the Faust agents,
because the agents' backlog of events would otherwise starve it.

The trainer learns from mini-batches as samples arrive, and every ``publish_every_samples``
samples (or ``publish_every_seconds`` when new samples arrived) it:
1. writes a checkpoint to RocksDB with the offset of the next sample to read,
2. publishes a versioned update to ``policy-updates``,
3. commits that offset for its group.
A restarted trainer restores the newest checkpoint and reads on from its offset, so every sample
is trained on once in the model it restores.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition

from sec_online import topics
from sec_online.policy import encode_update
from sec_online.schemas import InvalidRecord, Sample, decode_sample
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from state.checkpoints import CheckpointStore
from streams.metrics import WorkerMetrics
from streams.retry import run_forever

logger = logging.getLogger(__name__)

POLL_MS = 500
BATCHES_PER_CALL = 4
MAX_WAIT_SECONDS = 1.0


class TrainerService:
    """Owns the trainer, its checkpoint store and the publication of policy updates."""

    def __init__(self, settings: Settings, n_features: int, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.n_features = n_features
        self.metrics = metrics
        self.partition = TopicPartition(settings.topic(topics.SAMPLES), 0)
        self.trainer: Trainer | None = None
        self.store: CheckpointStore | None = None
        self.version = 0
        self.next_offset: int | None = None
        self.samples_consumed = 0
        self.published_samples_consumed = 0
        self.invalid_samples = 0
        self.unpublished = 0
        self.last_event_ms = 0
        self.last_publish = time.monotonic()

    async def run(self) -> None:
        """Train until cancelled; reconnect after broker errors."""
        await run_forever("trainer consumer", self._consume, logger, on_error=self.drop_trainer)

    def drop_trainer(self) -> None:
        """Forget the trainer and close its checkpoint store."""
        self.trainer = None
        if self.store is not None:
            # Another worker on this machine may take the partition over and open the store.
            self.store.close()
            self.store = None

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=f"{self.settings.app_id}-trainer",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap, acks="all", max_request_size=2**21
        )
        consumer.subscribe([self.partition.topic], listener=_Listener(self, consumer))
        await consumer.start()
        await producer.start()
        pending: list[Any] = []
        oldest = time.monotonic()
        try:
            while True:
                batches = await consumer.getmany(
                    timeout_ms=POLL_MS, max_records=self.settings.batch_size * 16
                )
                if not pending:
                    oldest = time.monotonic()
                pending.extend(record for batch in batches.values() for record in batch)
                # Full mini-batches: a step on a handful of samples costs nearly as much as a
                # step on a whole batch. A partial batch waits at most MAX_WAIT_SECONDS.
                full = len(pending) >= self.settings.batch_size * BATCHES_PER_CALL
                if pending and (full or time.monotonic() - oldest >= MAX_WAIT_SECONDS):
                    await self._learn(pending)
                    pending = []
                await self._publish_if_due(consumer, producer)
        finally:
            await producer.stop()
            await consumer.stop()

    def restore(self) -> None:
        """Load the newest checkpoint, or start a fresh trainer when there is none."""
        path = self.settings.work_dir / "checkpoints" / self.settings.app_id
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.store is None:
            self.store = CheckpointStore(path)
        latest = self.store.load_latest()
        if latest is None:
            self.trainer = Trainer(self.n_features, self.settings.clusters, self.settings)
            self.version, self.next_offset = 0, None
            logger.info("trainer starting fresh features=%d", self.n_features)
            return
        self.version, blob, meta = latest
        self.trainer = Trainer.restore(blob, self.settings)
        self.next_offset = meta.get("next_offset")
        logger.info(
            "trainer restored version=%d next_offset=%s samples_seen=%d",
            self.version,
            self.next_offset,
            self.trainer.samples_seen,
        )

    async def _learn(self, records: list[Any]) -> None:
        samples: list[Sample] = []
        for record in records:
            try:
                samples.append(decode_sample(record.value))
            except InvalidRecord as exc:
                self.invalid_samples += 1
                logger.error(
                    "invalid record on the samples topic offset=%d: %s", record.offset, exc
                )
        self.next_offset = records[-1].offset + 1
        self.samples_consumed += len(samples)
        if not samples or self.trainer is None:
            return
        trainer = self.trainer
        # Inline on purpose: a batch costs milliseconds, while a thread would wait for the GIL
        # after every torch call because the agents keep the event loop busy.
        losses = trainer.learn_many(samples)
        # Feeds the samples-per-second figure of /stats/ and /metrics.
        self.metrics.record_trained(len(samples))
        self.last_event_ms = max(self.last_event_ms, max(s.time_ms for s in samples))
        if losses:
            self.metrics.record_loss(self.last_event_ms, trainer.steps, losses[-1])
        self.unpublished += len(samples)

    async def _publish_if_due(self, consumer: AIOKafkaConsumer, producer: Any) -> None:
        if self.trainer is None or self.unpublished == 0:
            return
        enough = self.unpublished >= self.settings.publish_every_samples
        waited = time.monotonic() - self.last_publish >= self.settings.publish_every_seconds
        if enough or waited:
            await self._publish(consumer, producer)

    async def _publish(self, consumer: AIOKafkaConsumer, producer: Any) -> None:
        trainer, store = self.trainer, self.store
        assert trainer is not None and store is not None
        version = self.version + 1
        now_ms = int(time.time() * 1000)
        # Inline for the same reason as training; building an update takes about 0.5 s.
        update = trainer.make_update(version, now_ms)
        blob = trainer.checkpoint()
        meta = {
            "version": version,
            "created_ms": now_ms,
            "samples_seen": trainer.samples_seen,
            "next_offset": self.next_offset,
            "last_event_ms": self.last_event_ms,
        }
        # Checkpoint first: a published version always has its checkpoint, so a restarted
        # trainer never publishes the same version number twice.
        store.save(version, blob, meta)
        store.prune(keep=5)
        await producer.send_and_wait(
            self.settings.topic(topics.POLICY_UPDATES),
            key=str(version).encode(),
            value=encode_update(update),
        )
        if self.next_offset is not None:
            await consumer.commit({self.partition: self.next_offset})
        self.version = version
        self.unpublished = 0
        self.published_samples_consumed = self.samples_consumed
        self.last_publish = time.monotonic()
        logger.info(
            "published policy version=%d samples_seen=%d steps=%d loss=%s",
            version,
            trainer.samples_seen,
            trainer.steps,
            f"{trainer.last_loss:.4f}" if trainer.last_loss is not None else "none",
        )

    def as_dict(self) -> dict[str, Any]:
        """Trainer figures for the worker's stats page."""
        trainer = self.trainer
        return {
            "active": trainer is not None,
            "version": self.version,
            "samples_consumed": self.samples_consumed,
            "published_samples_consumed": self.published_samples_consumed,
            "invalid_samples": self.invalid_samples,
            "next_offset": self.next_offset,
            "samples_seen": trainer.samples_seen if trainer else 0,
            "samples_skipped": dict(trainer.samples_skipped) if trainer else {},
            "steps": trainer.steps if trainer else 0,
            "last_loss": trainer.last_loss if trainer else None,
        }


class _Listener(ConsumerRebalanceListener):
    """Restore the trainer when this worker gets the samples partition; drop it when it goes."""

    def __init__(self, service: TrainerService, consumer: AIOKafkaConsumer) -> None:
        self.service = service
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.service.partition in revoked:
            logger.info("samples partition revoked, trainer stops")
            self.service.drop_trainer()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if self.service.partition not in assigned:
            return
        self.service.restore()
        if self.service.next_offset is not None:
            self.consumer.seek(self.service.partition, self.service.next_offset)
