"""Follow the ``policy-updates`` topic and keep the newest valid policy for serving.

Every worker reads the whole topic itself, outside the consumer group, so each one serves the same
newest version. An update that fails to decode or whose checksum does not match is logged and
skipped: serving keeps the previous version.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer

from sec_online import topics
from sec_online.levels import even_boundaries
from sec_online.policy import InvalidPolicyUpdate, Policy, PolicyUpdate, decode_update
from sec_online.settings import Settings
from streams.retry import run_forever

logger = logging.getLogger(__name__)


class PolicyFollower:
    """Newest policy update seen on the topic, and the policy built from it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.update: PolicyUpdate | None = None
        self.policy: Policy | None = None
        self.invalid_updates = 0
        self.ready = asyncio.Event()

    def boundaries(self) -> tuple[list[float], int]:
        """Level boundaries in force and the policy version they come from (0: initial split)."""
        if self.update is None:
            return even_boundaries(self.settings.levels), 0
        return list(self.update.boundaries), self.update.version

    def accept(self, raw: bytes) -> bool:
        """Adopt an encoded update if it is valid and newer than the current one."""
        try:
            update = decode_update(raw)
        except InvalidPolicyUpdate as exc:
            self.invalid_updates += 1
            logger.error("skipped invalid policy update: %s", exc)
            return False
        if self.update is not None and update.version <= self.update.version:
            return False
        self.policy = Policy.from_update(update)
        self.update = update
        logger.info(
            "serving policy version=%d samples_seen=%d", update.version, update.samples_seen
        )
        return True

    async def run(self) -> None:
        """Consume the topic until cancelled, reconnecting after broker errors."""
        await run_forever("policy-updates consumer", self._consume, logger)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            self.settings.topic(topics.POLICY_UPDATES),
            bootstrap_servers=self.settings.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            async for message in consumer:
                if message.value is not None:
                    self.accept(message.value)
                    self.ready.set()
        finally:
            await consumer.stop()
