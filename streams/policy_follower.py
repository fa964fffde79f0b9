"""Follow the ``policy-updates`` topic and keep the newest valid policy for serving.

Every worker reads the whole topic itself, outside the consumer group, so each one serves the same
newest version. An update that fails to decode, whose checksum does not match or whose weights
do not load is logged with its reason, counted in ``invalid_updates`` and skipped, so serving
keeps the previous version until the next valid one. An update whose version is not newer than
the served one is skipped too, so the served version never goes backwards.

Before its agents start, a worker loads the newest valid update among the last
``PRELOAD_RECORDS`` of the topic (``preload``), so its first returns are rated with the newest
published boundaries rather than the initial split. The follower task then reads the topic from
the beginning and skips the versions it already has.
"""

from __future__ import annotations

import logging
from collections import Counter

from aiokafka import AIOKafkaConsumer, TopicPartition

from sec_online import topics
from sec_online.kafka_admin import offset_ranges, read_range
from sec_online.levels import even_boundaries
from sec_online.policy import InvalidPolicyUpdate, Policy, PolicyUpdate, decode_update
from sec_online.settings import Settings
from streams.retry import run_forever

logger = logging.getLogger(__name__)

# Records read back from the end of the topic at start; invalid updates are rare, so the newest
# valid one is almost always among them.
PRELOAD_RECORDS = 20


class PolicyFollower:
    """Newest policy update seen on the topic, and the policy built from it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.update: PolicyUpdate | None = None
        self.policy: Policy | None = None
        self.invalid_updates = 0
        self.invalid_update_reasons: Counter[str] = Counter()

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

    def preload(self, timeout_s: float = 30.0) -> int:
        """Load the newest valid update among the topic's last records; returns its version.

        Runs before the worker's event loop starts. Returns 0 when the topic has no valid update.
        """
        topic = self.settings.topic(topics.POLICY_UPDATES)
        first, end = offset_ranges(self.settings.bootstrap, topic, timeout_s).get(0, [0, 0])
        if end <= first:
            return 0
        start = max(first, end - PRELOAD_RECORDS)
        records, _ = read_range(
            self.settings.bootstrap, topic, start={0: start}, end={0: end}, timeout_s=timeout_s
        )
        for record in reversed(records):
            if record.value is not None and self.accept(record.value, record.offset):
                break
        return self.update.version if self.update is not None else 0

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
            # One partition, so updates are read in the order they were published.
            consumer.assign([TopicPartition(topic, 0)])
            async for message in consumer:
                if message.value is not None:
                    self.accept(message.value, message.offset)
        finally:
            await consumer.stop()
