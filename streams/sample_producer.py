"""Producer of the ``samples`` topic: a batch's samples in few produce requests, acknowledged.

Sending each sample with Faust's ``Topic.send`` made a batch of 500 samples wait 100 to 400 ms
on a 2-core machine (an estimate from timing the agents' batches). This producer packs the
samples into aiokafka record batches of up to ``MAX_BATCH_BYTES``. It waits until all replicas
acknowledge them, because the agents store the states that emitted them only after that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from sec_online.schemas import Sample, encode, encode_key
from streams.retry import RETRY_SECONDS

logger = logging.getLogger(__name__)

# Record batches of up to 512 KiB: below the broker's default max.message.bytes (1 MiB), which
# the samples topic keeps.
MAX_BATCH_BYTES = 512 * 1024


class SampleProducer:
    """Send samples to the single partition of the samples topic and wait for their acks.

    The aiokafka producer starts on the first send, so agents that run before the app's services
    have started can use it, and :meth:`stop` closes it at shutdown.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    async def send(self, samples: Sequence[Sample]) -> None:
        """Send ``samples`` in order and return once the broker has acknowledged every one.

        A failed send is logged and tried again every ``RETRY_SECONDS`` until it succeeds, so
        the caller's batch waits through a broker outage. A retry may send again samples that
        were already acknowledged, which the trainer skips as repeats.
        """
        if not samples:
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._send_once(samples)
                return
            except KafkaError as exc:
                logger.warning(
                    "sending %d samples failed (attempt %d), retrying in %.0f s: %r",
                    len(samples),
                    attempt,
                    RETRY_SECONDS,
                    exc,
                )
                await asyncio.sleep(RETRY_SECONDS)

    async def _send_once(self, samples: Sequence[Sample]) -> None:
        records = [(encode_key(sample.user_id), encode(sample)) for sample in samples]
        for (key, value), sample in zip(records, samples, strict=True):
            # A sample is 1 to 2 kB (45 features, at most one pair per video cluster), so this
            # is a bug, which no retry would fix.
            if len(key) + len(value) > MAX_BATCH_BYTES:
                raise ValueError(
                    f"sample of user {sample.user_id} session {sample.session_id} is "
                    f"{len(value)} bytes, larger than a record batch ({MAX_BATCH_BYTES} bytes)"
                )
        producer = await self._started()
        delivered = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                delivered.append(await producer.send_batch(batch, self.topic, partition=0))
                # An empty batch always takes its first record (aiokafka 0.14.0).
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        delivered.append(await producer.send_batch(batch, self.topic, partition=0))
        await asyncio.gather(*delivered)

    async def stop(self) -> None:
        """Flush and close the producer, if it was started."""
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await producer.stop()

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    acks="all",
                    max_batch_size=MAX_BATCH_BYTES,
                    max_request_size=2 * MAX_BATCH_BYTES,
                )
                await producer.start()
                logger.info("sample producer started topic=%s", self.topic)
                self._producer = producer
        return self._producer
