"""State dump: compaction semantics, ordering, line format, and a read from a real changelog."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from contextlib import redirect_stdout

import pytest
from kafka import KafkaProducer

from sec_online import topics
from sec_online.cli import main
from sec_online.kafka_admin import TopicSpec, ensure_topics
from sec_online.policy import encode_update
from sec_online.runtime import create_topics
from sec_online.schemas import Sample
from sec_online.settings import Settings
from sec_online.statedump import (
    StateDumpError,
    changelog_topic,
    decode_states,
    dump_states,
    last_values,
    newest_policy_version,
    write_dump,
)
from sec_online.trainer import Trainer

N_FEATURES = 45


def _state(user_id: int, impressions: int) -> bytes:
    return json.dumps({"user_id": user_id, "impressions": impressions}).encode()


def test_last_value_wins():
    latest = last_values([(b"1", b"a"), (b"2", b"b"), (b"1", b"c")])
    assert latest == {b"1": b"c", b"2": b"b"}


def test_tombstone_deletes_key():
    latest = last_values([(b"1", b"a"), (b"2", b"b"), (b"1", None)])
    assert latest == {b"2": b"b"}


def test_value_after_tombstone_restores_key():
    latest = last_values([(b"1", b"a"), (b"1", None), (b"1", b"c")])
    assert latest == {b"1": b"c"}


def test_record_without_key_skipped():
    assert last_values([(None, b"a"), (b"3", b"b")]) == {b"3": b"b"}


def test_states_ordered_by_numeric_user_id():
    latest = {b"10": _state(10, 1), b"9": _state(9, 2), b"100": _state(100, 3)}
    states = decode_states(latest)
    assert [state["user_id"] for state in states] == [9, 10, 100]


def test_non_numeric_key_rejected():
    with pytest.raises(StateDumpError, match="expected a user id in decimal text"):
        decode_states({b"user-1": _state(1, 1)}, "app-users-changelog")


def test_non_json_value_rejected():
    with pytest.raises(StateDumpError, match="invalid JSON value for key b'4'"):
        decode_states({b"4": b"\xff"})


def test_non_object_value_rejected():
    with pytest.raises(StateDumpError, match="contains a list for key b'4'"):
        decode_states({b"4": b"[1]"})


def test_write_dump_lines(tmp_path):
    path = tmp_path / "out" / "dump.jsonl"
    states = [{"user_id": 1, "impressions": 3}, {"user_id": 2, "impressions": 0}]
    assert write_dump(states, 7, path) == 2
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"user_id": 1, "impressions": 3, "policy_version": 7},
        {"user_id": 2, "impressions": 0, "policy_version": 7},
    ]
    assert not (tmp_path / "out" / "dump.jsonl.partial").exists()
    assert states[0] == {"user_id": 1, "impressions": 3}


def test_write_dump_stdout():
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert write_dump([{"user_id": 5}], 0, "-") == 1
    assert buffer.getvalue() == '{"user_id":5,"policy_version":0}\n'


def test_changelog_topic_name():
    settings = Settings(data_dir=None, app_id="shop-a")
    assert changelog_topic(settings) == "shop-a-users-changelog"
    prefixed = Settings(data_dir=None, app_id="shop-a", topic_prefix="run1.")
    assert changelog_topic(prefixed) == "shop-a-run1.users-changelog"


@pytest.fixture
def dump_settings(kafka_bootstrap, topic_prefix, tmp_path) -> Settings:
    settings = dataclasses.replace(
        Settings(data_dir=None),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        app_id=topic_prefix + "app",
        work_dir=tmp_path,
        partitions=3,
    )
    create_topics(settings)
    spec = TopicSpec(changelog_topic(settings), 3, {"cleanup.policy": "compact"})
    ensure_topics(kafka_bootstrap, [spec])
    return settings


def _policy_update(version: int) -> bytes:
    trainer = Trainer(N_FEATURES, 32, Settings(data_dir=None))
    rng = random.Random(version)
    samples = [
        Sample(
            event_id=f"e{index}",
            user_id=index,
            session_id=index,
            time_ms=index,
            features=[rng.gauss(0.0, 1.0) for _ in range(N_FEATURES)],
            actions=[[rng.randrange(32), 1.0]],
            level=index % 3,
            retention_score=rng.random(),
            gap_ms=1000,
        )
        for index in range(60)
    ]
    trainer.learn_many(samples)
    return encode_update(trainer.make_update(version=version, created_ms=1_700_000_000_000))


def test_dump_reads_changelog(dump_settings, tmp_path, monkeypatch):
    settings = dump_settings
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, max_request_size=2**23)
    topic = changelog_topic(settings)
    # Same partition per key, as Faust writes them; user 7 is deleted, user 30 rewritten.
    for partition, key, value in [
        (0, b"30", _state(30, 1)),
        (1, b"7", _state(7, 5)),
        (2, b"200", _state(200, 2)),
        (0, b"30", _state(30, 4)),
        (1, b"7", None),
    ]:
        producer.send(topic, key=key, value=value, partition=partition).get(30)
    updates = settings.topic(topics.POLICY_UPDATES)
    for value in (_policy_update(2), b'{"schema": "broken"}', _policy_update(5)):
        producer.send(updates, key=b"policy", value=value).get(30)
    producer.close()

    states = dump_states(settings)
    assert states == [{"user_id": 30, "impressions": 4}, {"user_id": 200, "impressions": 2}]
    assert newest_policy_version(settings) == 5

    for name, value in {
        "SEC_BOOTSTRAP_SERVERS": settings.bootstrap,
        "SEC_TOPIC_PREFIX": settings.topic_prefix,
        "SEC_APP_ID": settings.app_id,
    }.items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "dump.jsonl"
    assert main(["state", "dump", "--output", str(output)]) == 0
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["user_id"] for line in lines] == [30, 200]
    assert [line["policy_version"] for line in lines] == [5, 5]
    assert lines[0]["impressions"] == 4


def test_dump_without_policy_updates(dump_settings):
    assert newest_policy_version(dump_settings) == 0
    assert dump_states(dump_settings) == []
