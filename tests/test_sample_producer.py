"""The samples producer against the real broker: every sample delivered once and in order."""

from __future__ import annotations

import asyncio

import pytest

from sec_online.kafka_admin import TopicSpec, ensure_topics, read_all
from sec_online.schemas import Sample, decode_sample
from streams.sample_producer import MAX_BATCH_BYTES, SampleProducer

pytestmark = pytest.mark.broker

# Enough 45-feature samples (about 1 kB each) to need several record batches.
SAMPLES = 2_500


def make_sample(index: int, features: int = 45) -> Sample:
    return Sample(
        event_id=f"return:{index}",
        user_id=index % 97,
        session_id=1_650_000_000_000 + index,
        time_ms=1_650_000_000_000 + index,
        features=[index / 7.0] * features,
        actions=[[index % 32, 1.0]],
        level=index % 3,
        retention_score=0.5,
        gap_ms=60_000,
    )


@pytest.fixture
def topic(kafka_bootstrap: str, topic_prefix: str) -> str:
    name = f"{topic_prefix}samples"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, 1, {})])
    return name


def test_samples_delivered_in_order(kafka_bootstrap, topic):
    samples = [make_sample(index) for index in range(SAMPLES)]
    producer = SampleProducer(kafka_bootstrap, topic)

    async def send_twice() -> None:
        try:
            await producer.send(samples[:1_000])
            await producer.send(samples[1_000:])
            await producer.send([])
        finally:
            await producer.stop()

    asyncio.run(send_twice())

    records = read_all(kafka_bootstrap, topic)
    assert len(records) == SAMPLES
    assert [decode_sample(r.value) for r in records] == samples
    assert [r.key for r in records] == [str(s.user_id).encode() for s in samples]
    # 2,500 samples of about 1 kB do not fit one record batch of MAX_BATCH_BYTES.
    assert sum(len(r.value) for r in records) > MAX_BATCH_BYTES


def test_sample_larger_than_batch_rejected(kafka_bootstrap, topic):
    huge = make_sample(0, features=MAX_BATCH_BYTES // 4)
    producer = SampleProducer(kafka_bootstrap, topic)

    async def send() -> None:
        try:
            await producer.send([huge])
        finally:
            await producer.stop()

    with pytest.raises(ValueError, match="larger than a record batch"):
        asyncio.run(send())
    assert read_all(kafka_bootstrap, topic) == []
