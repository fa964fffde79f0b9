"""Freshness: time from a return being produced to the first policy update that learned from it.

A return closes the user's previous session, and the worker emits that session's sample with
the return's event id. The samples topic has one partition that the trainer reads in offset
order, so the sample at offset ``o`` is in every update whose trainer had consumed more than
``o`` samples: ``samples_seen + skipped > o``. The update's publication time is its Kafka record
timestamp (the trainer's producer sets it, on the same machine's clock as the send times).

Input is sent in steps of increasing steady rates. A step's freshness needs the update that
covers its last sample, so the benchmark waits for the worker to drain before the next step.
Returns whose update did not arrive before the timeout are counted with the time waited so far,
which makes the percentiles lower bounds. ``censored`` is the count of such returns.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks.kafka_io import Record, produce_paced
from benchmarks.pipeline import WorkerGroup, wait_idle
from sec_online import topics
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

# A step keeps up when the workers consumed at least this share of its input while it ran.
KEEP_UP_SHARE = 0.9
FRESHNESS_TARGET_S = 5.0


@dataclass
class _Observed:
    """Records read by the background consumers: sample offsets and policy updates."""

    sample_offsets: dict[str, int] = field(default_factory=dict)
    update_samples_seen: list[int] = field(default_factory=list)
    update_times_s: list[float] = field(default_factory=list)


async def _follow(settings: Settings, topic: str, on_message: Callable[[Any], None]) -> None:
    """Read the first partition of ``topic`` from its beginning and pass each record on."""
    consumer = _consumer(settings.bootstrap)
    partition = TopicPartition(settings.topic(topic), 0)
    await consumer.start()
    try:
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        async for message in consumer:
            on_message(message)
    finally:
        await consumer.stop()


def _record_sample(observed: _Observed, message: Any) -> None:
    event_id = json.loads(message.value)["event_id"]
    observed.sample_offsets.setdefault(event_id, message.offset)


def _record_update(observed: _Observed, message: Any) -> None:
    observed.update_samples_seen.append(json.loads(message.value)["samples_seen"])
    observed.update_times_s.append(message.timestamp / 1000)


def _consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        client_id="sec-online-bench-freshness",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )


async def measure_freshness(
    settings: Settings,
    group: WorkerGroup,
    records: Sequence[Record],
    rates: Sequence[float],
    step_seconds: float,
    timeout_s: float,
) -> dict[str, Any]:
    """Send ``records`` in steps of ``rates`` (events/s), ``step_seconds`` each; measure freshness.

    ``group`` must already have consumed every event sent before, so each step starts from a
    drained worker. Returns one entry per step under ``steps``, and the trainer's skipped and
    invalid samples, which would shift the offset test described in the module docstring.
    """
    observed = _Observed()
    followers = [
        asyncio.create_task(
            _follow(settings, topics.SAMPLES, functools.partial(_record_sample, observed))
        ),
        asyncio.create_task(
            _follow(settings, topics.POLICY_UPDATES, functools.partial(_record_update, observed))
        ),
    ]
    steps = []
    cursor = 0
    consumed_base = await asyncio.to_thread(group.consumed)
    try:
        for rate in rates:
            count = min(int(rate * step_seconds), len(records) - cursor)
            if count <= 0:
                logger.warning("no events left for the freshness step at %.0f ev/s", rate)
                break
            chunk = records[cursor : cursor + count]
            cursor += count
            step = await _run_step(group, chunk, rate, consumed_base + cursor, observed, timeout_s)
            steps.append(step)
            logger.info("freshness step %s", step)
        final = await asyncio.to_thread(group.stats)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    trainers = [s["trainer"] for s in final if s["trainer"]["active"]]
    return {
        "steps": steps,
        "trainer_samples_skipped": sum(sum(t["samples_skipped"].values()) for t in trainers),
        "trainer_invalid_samples": sum(t["invalid_samples"] for t in trainers),
        "publish_every_samples": settings.publish_every_samples,
        "publish_every_seconds": settings.publish_every_seconds,
    }


async def _run_step(
    group: WorkerGroup,
    chunk: Sequence[Record],
    rate: float,
    total_after: int,
    observed: _Observed,
    timeout_s: float,
) -> dict[str, Any]:
    sent_s: dict[str, float] = {}
    before = await asyncio.to_thread(group.consumed)
    seconds = await produce_paced(group.workers[0].settings.bootstrap, chunk, rate, sent_s)
    after = await asyncio.to_thread(group.consumed)
    drained = True
    try:
        await asyncio.to_thread(wait_idle, group, total_after, timeout_s)
    except TimeoutError as exc:
        logger.warning("freshness step at %.0f ev/s did not drain: %s", rate, exc)
        drained = False
    # The updates consumer may still be fetching the newest update.
    await asyncio.sleep(1.0)
    latencies, censored = _latencies(sent_s, observed)
    worker_eps = (after - before) / seconds if seconds > 0 else 0.0
    step: dict[str, Any] = {
        "input_eps": rate,
        "events": len(chunk),
        "achieved_input_eps": len(chunk) / seconds if seconds > 0 else 0.0,
        "worker_eps_during_step": worker_eps,
        "keeps_up": worker_eps >= KEEP_UP_SHARE * len(chunk) / seconds,
        "drained": drained,
        "returns": len(sent_s),
        "samples": len(latencies),
        "censored": censored,
    }
    step.update(_percentiles(latencies))
    return step


def _latencies(sent_s: dict[str, float], observed: _Observed) -> tuple[list[float], int]:
    now = time.time()
    latencies = []
    censored = 0
    seen = list(observed.update_samples_seen)
    times = list(observed.update_times_s)
    for event_id, sent in sent_s.items():
        offset = observed.sample_offsets.get(event_id)
        if offset is None:
            continue  # a user's first session, or an empty one: no sample
        index = bisect.bisect_left(seen, offset + 1)
        if index < len(seen):
            latencies.append(times[index] - sent)
        else:
            latencies.append(now - sent)
            censored += 1
    return latencies, censored


def _percentiles(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_s": None, "p99_s": None, "max_s": None}
    values = np.asarray(latencies)
    return {
        "p50_s": float(np.percentile(values, 50)),
        "p99_s": float(np.percentile(values, 99)),
        "max_s": float(values.max()),
    }


def breaking_rate(steps: Sequence[dict[str, Any]]) -> float | None:
    """Lowest input rate whose step missed the p99 target or fell behind, None if none did."""
    for step in steps:
        p99 = step.get("p99_s")
        missed = p99 is None or p99 >= FRESHNESS_TARGET_S
        if missed or not step["keeps_up"] or step["censored"]:
            return float(step["input_eps"])
    return None
