"""Tests of the Kafka admin helpers against the session's real broker."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from sec_online.kafka_admin import (
    BrokerUnavailable,
    KafkaAdminError,
    TopicLayoutError,
    TopicNotFound,
    TopicSpec,
    committed_offsets,
    delete_topics,
    end_offsets,
    ensure_topics,
    read_all,
    wait_for_broker,
)


def _produce(bootstrap: str, topic: str, rows: list[tuple[int | None, bytes, bytes]]) -> None:
    """Send ``(partition, key, value)`` rows. A partition of None lets the key choose it."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for partition, key, value in rows:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


# Topics.
@pytest.mark.broker
def test_ensure_topics_creates_once(kafka_bootstrap: str, topic_prefix: str) -> None:
    specs = [
        TopicSpec(f"{topic_prefix}events", 4, {"retention.ms": "-1"}),
        TopicSpec(f"{topic_prefix}updates", 1),
    ]
    assert ensure_topics(kafka_bootstrap, specs) == [spec.name for spec in specs]
    assert ensure_topics(kafka_bootstrap, specs) == []
    assert sorted(end_offsets(kafka_bootstrap, specs[0].name)) == [0, 1, 2, 3]
    assert end_offsets(kafka_bootstrap, specs[1].name) == {0: 0}


@pytest.mark.broker
def test_ensure_topics_partition_mismatch(kafka_bootstrap: str, topic_prefix: str) -> None:
    name = f"{topic_prefix}events"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, 2)])
    with pytest.raises(TopicLayoutError) as caught:
        ensure_topics(kafka_bootstrap, [TopicSpec(name, 4)])
    message = str(caught.value)
    assert f"{name} has 2 partitions, expected 4" in message
    assert kafka_bootstrap in message
    assert "SEC_PARTITIONS" in message
    assert sorted(end_offsets(kafka_bootstrap, name)) == [0, 1]


@pytest.mark.broker
def test_ensure_topics_rejects_replication(kafka_bootstrap: str, topic_prefix: str) -> None:
    name = f"{topic_prefix}replicated"
    with pytest.raises(KafkaAdminError) as caught:
        ensure_topics(kafka_bootstrap, [TopicSpec(name, 1)], replication_factor=3)
    message = str(caught.value)
    assert f"creating topic {name} failed with InvalidReplicationFactorError" in message


def test_ensure_topics_rejects_repeated_names() -> None:
    specs = [TopicSpec("same", 1), TopicSpec("same", 2)]
    with pytest.raises(ValueError, match="repeat a name"):
        ensure_topics("127.0.0.1:1", specs)


@pytest.mark.parametrize(
    ("name", "partitions", "fragment"),
    [
        ("has space", 1, "invalid topic name"),
        ("", 1, "invalid topic name"),
        ("x" * 250, 1, "invalid topic name"),
        ("..", 1, "invalid topic name"),
        ("fine", 0, "invalid partition count 0"),
    ],
)
def test_topic_spec_validation(name: str, partitions: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TopicSpec(name, partitions)


@pytest.mark.broker
def test_delete_topics_skips_missing(kafka_bootstrap: str, topic_prefix: str) -> None:
    name = f"{topic_prefix}doomed"
    ensure_topics(kafka_bootstrap, [TopicSpec(name, 1)])
    delete_topics(kafka_bootstrap, [name, f"{topic_prefix}never-created"])
    with pytest.raises(TopicNotFound, match=f"topic {name} not found"):
        end_offsets(kafka_bootstrap, name)
    assert ensure_topics(kafka_bootstrap, [TopicSpec(name, 3)]) == [name]


# Reading and offsets.
@pytest.mark.broker
def test_produce_read_all_round_trip(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}impressions"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 3)])
    sent = [(None, f"user-{i % 5}".encode(), f"event-{i}".encode()) for i in range(40)]
    _produce(kafka_bootstrap, topic, sent)

    records = read_all(kafka_bootstrap, topic, timeout_s=30)

    assert len(records) == len(sent)
    assert sorted(record.value for record in records) == sorted(row[2] for row in sent)
    positions = [(record.partition, record.offset) for record in records]
    assert positions == sorted(positions)
    partitions_of_key: dict[bytes, set[int]] = {}
    for record in records:
        partitions_of_key.setdefault(record.key, set()).add(record.partition)
    assert all(len(partitions) == 1 for partitions in partitions_of_key.values())
    # Within one key, records keep the order in which they were sent.
    for key in partitions_of_key:
        values = [record.value for record in records if record.key == key]
        assert values == [row[2] for row in sent if row[1] == key]


@pytest.mark.broker
def test_read_all_empty_topic(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}empty"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 2)])
    started = time.monotonic()
    assert read_all(kafka_bootstrap, topic, timeout_s=10) == []
    assert time.monotonic() - started < 5


@pytest.mark.broker
def test_offsets_of_consumer_group(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}returns"
    group = f"{topic_prefix}group"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 3)])
    counts = {0: 5, 1: 2, 2: 0}
    rows = [(p, b"k", f"{p}-{i}".encode()) for p, n in counts.items() for i in range(n)]
    _produce(kafka_bootstrap, topic, rows)

    assert end_offsets(kafka_bootstrap, topic) == counts
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 0, 1: 0, 2: 0}

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "", -1)})
    finally:
        consumer.close(autocommit=False)
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 3, 1: 0, 2: 0}
    assert committed_offsets(kafka_bootstrap, f"{group}-other", topic) == {0: 0, 1: 0, 2: 0}


@pytest.mark.broker
def test_subscribed_group_commits_are_reported(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}samples"
    group = f"{topic_prefix}trainer"
    ensure_topics(kafka_bootstrap, [TopicSpec(topic, 2)])
    _produce(kafka_bootstrap, topic, [(i % 2, b"k", b"v") for i in range(6)])

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 6 and time.monotonic() < deadline:
            seen += sum(len(rows) for rows in consumer.poll(timeout_ms=500).values())
        consumer.commit()
    finally:
        consumer.close(autocommit=False)
    assert seen == 6
    assert committed_offsets(kafka_bootstrap, group, topic) == end_offsets(kafka_bootstrap, topic)
    assert end_offsets(kafka_bootstrap, topic) == {0: 3, 1: 3}


@pytest.mark.broker
def test_missing_topic_raises_not_found(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}absent"
    calls: list[Callable[[], object]] = [
        lambda: end_offsets(kafka_bootstrap, topic),
        lambda: committed_offsets(kafka_bootstrap, "any-group", topic),
        lambda: read_all(kafka_bootstrap, topic, timeout_s=10),
    ]
    for call in calls:
        with pytest.raises(TopicNotFound, match=f"topic {topic} not found on {kafka_bootstrap}"):
            call()


# Readiness.
def test_wait_for_broker_closed_port_times_out(
    free_ports: Callable[[int], list[int]], caplog: pytest.LogCaptureFixture
) -> None:
    (port,) = free_ports(1)
    bootstrap = f"127.0.0.1:{port}"
    caplog.set_level(logging.WARNING, logger="sec_online.kafka_admin")
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        wait_for_broker(bootstrap, timeout_s=2.0)
    elapsed = time.monotonic() - started

    message = str(caught.value)
    assert f"Kafka broker not reachable at {bootstrap}" in message
    assert "`sec-online broker start`" in message
    assert "SEC_BOOTSTRAP_SERVERS" in message
    assert caught.value.bootstrap == bootstrap
    assert 2.0 <= elapsed < 6.0
    attempts = [
        re.search(r"attempt=(\d+)/(\d+)", record.getMessage())
        for record in caplog.records
        if record.name == "sec_online.kafka_admin"
    ]
    assert attempts and all(attempts)
    numbers = [(int(m.group(1)), int(m.group(2))) for m in attempts if m]
    total = numbers[0][1]
    assert [n for n, _ in numbers] == list(range(1, total + 1))
    assert all(t == total for _, t in numbers)


@pytest.mark.broker
def test_wait_for_broker_running(kafka_bootstrap: str) -> None:
    started = time.monotonic()
    wait_for_broker(kafka_bootstrap, timeout_s=10)
    assert time.monotonic() - started < 5


def test_invalid_bootstrap_rejected() -> None:
    with pytest.raises(ValueError, match="invalid bootstrap servers"):
        wait_for_broker(" , ", timeout_s=1)
