"""Bare aiokafka producers and consumers: the broker's own speed, with no worker in between.

The raw figures set the ceiling that the worker pipeline is compared with. They use the same
broker, topics, record bytes and ``acks="all"`` as the replay, so the ratio isolates the
worker's own cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Sends queued before the producer waits for their acknowledgements; bounds memory.
SEND_WINDOW = 5_000
FETCH_MAX_RECORDS = 10_000
# Consumer reads give up when no new record arrives for this long before the end offsets.
CONSUME_IDLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Record:
    """One pre-encoded event: its topic, Kafka key and value, and its id for freshness."""

    topic: str
    key: bytes
    value: bytes
    event_id: str
    is_return: bool


def _producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        client_id="sec-online-bench",
    )


async def produce_all(bootstrap: str, records: Sequence[Record], progress: bool) -> float:
    """Send every record as fast as the broker acknowledges; returns the seconds taken.

    Sends are pipelined ``SEND_WINDOW`` at a time. The time covers the first send to the last
    acknowledgement, not the producer's start-up.
    """
    producer = _producer(bootstrap, linger_ms=20)
    await producer.start()
    try:
        started = time.perf_counter()
        pending: list[asyncio.Future] = []
        with tqdm(total=len(records), unit="record", desc="produce", disable=not progress) as bar:
            for record in records:
                pending.append(await producer.send(record.topic, record.value, key=record.key))
                if len(pending) >= SEND_WINDOW:
                    await asyncio.gather(*pending)
                    bar.update(len(pending))
                    pending = []
            await asyncio.gather(*pending)
            bar.update(len(pending))
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def consume_all(
    bootstrap: str, topic: str, partitions: int, progress: bool
) -> tuple[int, float]:
    """Read a topic from its start to its end offsets; returns (records, seconds).

    No consumer group and no deserialisation: the time is fetching only, from the first
    fetch request to the last record.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        client_id="sec-online-bench-raw",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    assigned = [TopicPartition(topic, partition) for partition in range(partitions)]
    await consumer.start()
    try:
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        end = await consumer.end_offsets(assigned)
        total = sum(end.values())
        count = 0
        started = time.perf_counter()
        last_progress = started
        with tqdm(total=total, unit="record", desc="consume", disable=not progress) as bar:
            while count < total:
                batches = await consumer.getmany(timeout_ms=1000, max_records=FETCH_MAX_RECORDS)
                fetched = sum(len(batch) for batch in batches.values())
                count += fetched
                bar.update(fetched)
                now = time.perf_counter()
                if fetched:
                    last_progress = now
                elif now - last_progress > CONSUME_IDLE_TIMEOUT_S:
                    raise TimeoutError(
                        f"raw consumer read {count} of {total} records of {topic} and then "
                        f"nothing for {CONSUME_IDLE_TIMEOUT_S:.0f} s; check the broker"
                    )
        return count, time.perf_counter() - started
    finally:
        await consumer.stop()


async def produce_paced(
    bootstrap: str, records: Sequence[Record], rate_eps: float, sent_s: dict[str, float]
) -> float:
    """Send records at a steady ``rate_eps``; returns the seconds the sends took.

    The wall-clock time (Unix s) at which each return was handed to the producer goes into
    ``sent_s`` by event id. ``linger_ms=5`` keeps batching from adding latency of its own.
    """
    producer = _producer(bootstrap, linger_ms=5)
    await producer.start()
    try:
        started = time.monotonic()
        pending: list[asyncio.Future] = []
        for index, record in enumerate(records):
            ahead = started + index / rate_eps - time.monotonic()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
            if record.is_return:
                sent_s[record.event_id] = time.time()
            pending.append(await producer.send(record.topic, record.value, key=record.key))
            if len(pending) >= SEND_WINDOW:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return time.monotonic() - started
    finally:
        await producer.stop()
