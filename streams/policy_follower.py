"""Follow the ``policy-updates`` topic and keep the newest valid policy for serving.

Every worker reads the whole topic itself, outside the consumer group, so each one serves the same
newest version. An update that fails to decode, whose checksum does not match or whose weights
do not load is logged with its reason, counted in ``invalid_updates`` and skipped, so serving
keeps the previous version until the next valid one. An update whose version is not newer than
the served one is skipped too, so the served version never goes backwards.

A worker that starts reads the topic from the beginning. Until it reaches the end offsets seen at
start, its boundaries may be older than the newest published ones, so the returns agent waits
for ``caught_up`` (at most ``CATCH_UP_TIMEOUT_S``) before it rates its first return.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from sec_online import topics
from sec_online.levels import even_boundaries
from sec_online.policy import InvalidPolicyUpdate, Policy, PolicyUpdate, decode_update
from sec_online.settings import Settings
from streams.retry import run_forever

logger = logging.getLogger(__name__)

# Seconds the returns agent waits for the follower to read the updates published before the
# worker started. After that it rates returns with the boundaries it has and logs a warning.
CATCH_UP_TIMEOUT_S = 60.0


class PolicyFollower:
    """Newest policy update seen on the topic, and the policy built from it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.update: PolicyUpdate | None = None
        self.policy: Policy | None = None
        self.invalid_updates = 0
        self.invalid_update_reasons: Counter[str] = Counter()
        # Set once every update published before this worker started has been read.
        self.caught_up = asyncio.Event()
        self._gave_up_waiting = False

    def boundaries(self) -> tuple[list[float], int]:
        """Level boundaries in force and the policy version they come from (0: initial split)."""
        if self.update is None:
            return even_boundaries(self.settings.levels), 0
        return list(self.update.boundaries), self.update.version

    def accept(self, raw: bytes, offset: int | None = None) -> bool:
        """Adopt an encoded update if it is valid and newer than the current one.

        ``offset`` is the record's offset on the topic, used in log messages only.
        """
        try:
            update = decode_update(raw)
            if self.update is not None and update.version <= self.update.version:
                return False
            # Loading the weights is the last check, because a record can pass its checksum and
            # still not fit the model configuration it names.
            policy = Policy.from_update(update)
        except InvalidPolicyUpdate as exc:
            self._reject(offset, exc.reason, exc.message)
            return False
        except Exception as exc:  # noqa: BLE001 - a bad record must not stop the follower
            # An error escaping here would restart the consumer at the earliest offset, where
            # the same record raises again, so serving would never see a newer version.
            self._reject(offset, "load_error", f"{type(exc).__name__}: {exc}")
            logger.exception("policy update offset=%s failed to load", offset)
            return False
        self.policy = policy
        self.update = update
        logger.info(
            "serving policy version=%d samples_seen=%d", update.version, update.samples_seen
        )
        return True

    def _reject(self, offset: int | None, reason: str, message: str) -> None:
        self.invalid_updates += 1
        self.invalid_update_reasons[reason] += 1
        serving = self.update.version if self.update is not None else 0
        logger.error(
            "rejected policy update offset=%s reason=%s serving version=%d: %s",
            offset,
            reason,
            serving,
            message,
        )

    async def wait_caught_up(self, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Wait until the updates published before start are read, or ``timeout_s`` passed."""
        if self.caught_up.is_set() or self._gave_up_waiting:
            return
        try:
            await asyncio.wait_for(self.caught_up.wait(), timeout_s)
        except TimeoutError:
            self._gave_up_waiting = True
            serving = self.update.version if self.update is not None else 0
            logger.warning(
                "policy-updates not read to the end within %.0f s; rating returns with "
                "version=%d until newer updates arrive",
                timeout_s,
                serving,
            )

    async def run(self) -> None:
        """Consume the topic until cancelled, reconnecting after broker errors."""
        await run_forever("policy-updates consumer", self._consume, logger)

    async def _consume(self) -> None:
        topic = self.settings.topic(topics.POLICY_UPDATES)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await consumer.start()
        try:
            remaining = await self._assign_all(consumer, topic)
            async for message in consumer:
                if message.value is not None:
                    self.accept(message.value, message.offset)
                partition = TopicPartition(message.topic, message.partition)
                if remaining.get(partition, 0) <= message.offset + 1:
                    remaining.pop(partition, None)
                if not remaining:
                    self.caught_up.set()
        finally:
            await consumer.stop()

    async def _assign_all(
        self, consumer: AIOKafkaConsumer, topic: str
    ) -> dict[TopicPartition, int]:
        """Assign the topic's partition and return its end offset if it has records to read.

        The topic has one partition (``sec_online.runtime.topic_specs``), so updates are read in
        the order they were published. Sets ``caught_up`` at once when it is empty.
        """
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        ends = await consumer.end_offsets([partition])
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        if not remaining:
            self.caught_up.set()
        return remaining
