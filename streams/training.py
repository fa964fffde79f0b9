"""Continuous fine-tuning of the SEC experts inside the worker that owns the samples topic.

The samples topic has one partition, so exactly one worker of the group trains. It restores the
newest checkpoint from its RocksDB checkpoint store, trains on mini-batches as samples arrive, and
every ``publish_every_samples`` samples (or ``publish_every_seconds`` when new samples arrived)
writes a checkpoint and then publishes a versioned update to ``policy-updates``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import faust

from sec_online import topics
from sec_online.policy import encode_update
from sec_online.schemas import Sample
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from state.checkpoints import CheckpointStore
from streams.metrics import WorkerMetrics

logger = logging.getLogger(__name__)


class TrainerService:
    """Owns the trainer, its checkpoint store and the publication of policy updates."""

    def __init__(
        self, settings: Settings, app: faust.App, n_features: int, metrics: WorkerMetrics
    ) -> None:
        self.settings = settings
        self.n_features = n_features
        self.metrics = metrics
        self.policy_topic = app.topic(
            settings.topic(topics.POLICY_UPDATES),
            key_type=bytes,
            value_type=bytes,
            key_serializer="raw",
            value_serializer="raw",
            partitions=1,
        )
        self.trainer: Trainer | None = None
        self.store: CheckpointStore | None = None
        self.version = 0
        self.samples_consumed = 0
        self.published_samples_consumed = 0
        self.invalid_samples = 0
        self.unpublished = 0
        self.last_event_ms = 0
        self.last_publish = time.monotonic()
        self._lock = asyncio.Lock()

    def _ensure_trainer(self) -> Trainer:
        if self.trainer is not None:
            return self.trainer
        path = self.settings.work_dir / "checkpoints" / self.settings.app_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store = CheckpointStore(path)
        latest = self.store.load_latest()
        if latest is None:
            self.trainer = Trainer(self.n_features, self.settings.clusters, self.settings)
            logger.info("trainer starting fresh features=%d", self.n_features)
        else:
            self.version, blob, meta = latest
            self.trainer = Trainer.restore(blob, self.settings)
            logger.info("trainer restored version=%d meta=%s", self.version, meta)
        return self.trainer

    async def learn(self, samples: list[Sample]) -> None:
        """Fine-tune on one batch of samples and publish when enough arrived."""
        self.samples_consumed += len(samples)
        if not samples:
            return
        async with self._lock:
            trainer = self._ensure_trainer()
            losses = trainer.learn_many(samples)
            self.last_event_ms = max(self.last_event_ms, max(s.time_ms for s in samples))
            if losses:
                self.metrics.record_loss(self.last_event_ms, trainer.steps, losses[-1])
            self.unpublished += len(samples)
            if self.unpublished >= self.settings.publish_every_samples:
                await self._publish()

    async def publish_if_due(self) -> None:
        """Publish when samples arrived since the last update and the interval has passed."""
        if self.samples_consumed == self.published_samples_consumed:
            return
        if time.monotonic() - self.last_publish < self.settings.publish_every_seconds:
            return
        async with self._lock:
            if self.trainer is not None and self.unpublished > 0:
                await self._publish()

    async def _publish(self) -> None:
        trainer = self._ensure_trainer()
        assert self.store is not None
        version = self.version + 1
        now_ms = int(time.time() * 1000)
        update = trainer.make_update(version, now_ms)
        meta = {
            "version": version,
            "created_ms": now_ms,
            "samples_seen": trainer.samples_seen,
            "last_event_ms": self.last_event_ms,
        }
        # The checkpoint is written before the update is sent: a published version always has
        # its checkpoint, so a restarted trainer never publishes the same version twice.
        self.store.save(version, trainer.checkpoint(), meta)
        self.store.prune(keep=5)
        await self.policy_topic.send(key=str(version).encode(), value=encode_update(update))
        self.version = version
        self.unpublished = 0
        self.published_samples_consumed = self.samples_consumed
        self.last_publish = time.monotonic()
        logger.info(
            "published policy version=%d samples_seen=%d steps=%d loss=%.4f",
            version,
            trainer.samples_seen,
            trainer.steps,
            trainer.last_loss if trainer.last_loss is not None else float("nan"),
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
            "samples_seen": trainer.samples_seen if trainer else 0,
            "steps": trainer.steps if trainer else 0,
            "last_loss": trainer.last_loss if trainer else None,
        }
