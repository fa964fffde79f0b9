"""Replay: event building without Kafka, then publishing to the real broker and reading back."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaConsumer, TopicPartition

from sec_online.replay import (
    ReplayError,
    build_events,
    iter_events,
    load_slice,
    replay,
)
from sec_online.runtime import create_topics
from sec_online.schemas import Impression, Return, decode_impression, decode_return, encode
from sec_online.settings import Settings

HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)
MINUTE = 60_000
HOUR = 60 * MINUTE
T = 1_650_931_200_000  # 2022-04-26 08:00 in UTC+8
# Start of the shipped slice published to the broker: 2022-04-28 00:00 UTC.
SHIPPED_START_MS = 1_651_104_000_000


def line(user: int, video: int, time_ms: int, like: int = 0, hate: int = 0) -> str:
    return f"{user},{video},20220426,800,{time_ms},1,{like},0,0,0,{hate},1,2000,9000,0,0,0,0,4"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [
        line(1, 10, T),
        line(2, 20, T + MINUTE),
        line(1, 11, T + MINUTE, like=1),
        line(1, 12, T + 2 * HOUR, hate=1),
        line(2, 21, T + 3 * HOUR),
        line(3, 30, T + 4 * HOUR),
    ]
    (folder / "log_standard_test.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    (folder / "user_last_seen_test.csv").write_text("user_id,last_time_ms\n1,1650900000000\n")
    return folder


def test_events_from_hand_written_log(data_dir):
    impressions, returns = build_events(Settings(data_dir=data_dir))
    assert [event.video_id for event in impressions] == [10, 20, 11, 12, 21, 30]
    first = impressions[0]
    assert first == Impression(
        event_id=f"1:{T}:10",
        user_id=1,
        video_id=10,
        time_ms=T,
        session_id=T,
        click=1,
        long_view=1,
        like=0,
        comment=0,
        forward=0,
        follow=0,
        hate=0,
        play_time_ms=2000,
        duration_ms=9000,
        tab=4,
    )
    assert impressions[2].like == 1
    assert impressions[2].session_id == T
    assert impressions[3].hate == 1
    assert len(returns) == 5
    by_session = {(event.user_id, event.session_id): event for event in returns}
    assert by_session[(1, T)].gap_ms == T - 1_650_900_000_000
    assert by_session[(1, T + 2 * HOUR)] == Return(
        event_id=f"return:1:{T + 2 * HOUR}",
        user_id=1,
        time_ms=T + 2 * HOUR,
        session_id=T + 2 * HOUR,
        previous_session_id=T,
        previous_session_impressions=2,
        gap_ms=2 * HOUR - MINUTE,
    )
    assert by_session[(3, T + 4 * HOUR)].gap_ms is None


def test_events_survive_encoding(data_dir):
    impressions, returns = build_events(Settings(data_dir=data_dir))
    for event in impressions:
        assert decode_impression(encode(event)) == event
    for event in returns:
        assert decode_return(encode(event)) == event


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
def test_iter_events_puts_return_first(data_dir, chunk_rows):
    settings = Settings(data_dir=data_dir)
    impressions, returns = build_events(settings)
    rows, returns_frame = load_slice(settings)
    ordered = list(iter_events(rows, returns_frame, chunk_rows=chunk_rows))
    assert len(ordered) == len(impressions) + len(returns)
    assert [event for event in ordered if isinstance(event, Impression)] == impressions
    assert sorted(event.event_id for event in ordered if isinstance(event, Return)) == sorted(
        event.event_id for event in returns
    )
    kinds = ["R" if isinstance(event, Return) else "I" for event in ordered]
    assert "".join(kinds) == "RIRIIRIRIRI"
    times = [event.time_ms for event in ordered]
    assert times == sorted(times)
    for index, event in enumerate(ordered):
        if isinstance(event, Return):
            following = ordered[index + 1]
            assert following.session_id == event.session_id
            assert following.user_id == event.user_id


def test_iter_events_checks_returns(data_dir):
    rows, returns = load_slice(Settings(data_dir=data_dir))
    first = returns["time_ms"] == T
    with pytest.raises(ReplayError, match=f"1 sessions have no return, the first is session {T}"):
        next(iter_events(rows, returns[~first]))
    with pytest.raises(ReplayError, match="1 returns have no impression"):
        next(iter_events(rows[rows["user_id"] != 3], returns))
    with pytest.raises(ReplayError, match=f"return return:1:{T} appears more than once"):
        next(iter_events(rows, pd.concat([returns, returns[first]])))


def test_slice_uses_earlier_rows_as_prior(data_dir):
    settings = Settings(data_dir=data_dir)
    rows, returns = load_slice(settings, start_ms=T + HOUR, end_ms=T + 4 * HOUR)
    assert rows["video_id"].tolist() == [12, 21]
    gaps = dict(zip(returns["user_id"], returns["gap_ms"], strict=True))
    assert gaps == {1: 2 * HOUR - MINUTE, 2: 3 * HOUR - MINUTE}
    assert returns["previous_session_id"].isna().all()
    limited, _ = load_slice(settings, start_ms=T + HOUR, limit=1)
    assert limited["video_id"].tolist() == [12]


def test_explicit_paths_read_last_seen_beside_them(data_dir):
    log_path = data_dir / "log_standard_test.csv"
    _, returns = build_events(Settings(data_dir=None), [log_path])
    assert returns[0].gap_ms == T - 1_650_900_000_000


def test_invalid_arguments(data_dir):
    settings = Settings(data_dir=data_dir)
    with pytest.raises(ValueError, match="limit must not be negative"):
        load_slice(settings, limit=-1)
    with pytest.raises(ValueError, match="speed must be None, 0 or positive"):
        replay(settings, speed=-2)


def test_no_broker_reported(data_dir, free_ports):
    (port,) = free_ports(1)
    settings = Settings(data_dir=data_dir, bootstrap_servers=f"127.0.0.1:{port}")
    with pytest.raises(ReplayError, match=f"cannot connect to Kafka at 127.0.0.1:{port}"):
        replay(settings, progress=False, producer_config={"bootstrap_timeout_ms": 1000})


def read_topic(bootstrap: str, topic: str, expected: int) -> list:
    """Read ``expected`` records of ``topic`` from the beginning, in partition then offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records = defaultdict(list)
        deadline = time.monotonic() + 60
        while sum(map(len, records.values())) < expected and time.monotonic() < deadline:
            for partition, batch in consumer.poll(timeout_ms=500).items():
                records[partition.partition].extend(batch)
        ends = consumer.end_offsets(partitions)
    finally:
        consumer.close()
    assert sum(ends.values()) == expected, f"{topic} holds {sum(ends.values())} records"
    return [record for partition in sorted(records) for record in records[partition]]


@pytest.fixture
def broker_settings(kafka_bootstrap, topic_prefix):
    settings = dataclasses.replace(
        Settings(), bootstrap_servers=kafka_bootstrap, topic_prefix=topic_prefix, partitions=3
    )
    if settings.data_dir is None:
        pytest.skip("the shipped KuaiRand folder is not next to the project")
    return settings


def test_replay_to_broker(broker_settings):
    settings = broker_settings
    create_topics(settings)
    report = replay(settings, start_ms=SHIPPED_START_MS, limit=3000, progress=False)
    impressions, returns = build_events(settings, start_ms=SHIPPED_START_MS, limit=3000)
    assert report.impressions == 3000
    assert report.returns == len(returns) > 1000
    assert report.users == len({event.user_id for event in impressions})
    assert report.first_time_ms == impressions[0].time_ms >= SHIPPED_START_MS
    assert report.last_time_ms == impressions[-1].time_ms
    assert report.topics == [
        f"{settings.topic_prefix}impressions",
        f"{settings.topic_prefix}returns",
    ]
    assert json.loads(json.dumps(report.to_dict()))["impressions"] == 3000

    impression_records = read_topic(settings.bootstrap, report.topics[0], 3000)
    return_records = read_topic(settings.bootstrap, report.topics[1], len(returns))
    decoded_impressions = [decode_impression(record.value) for record in impression_records]
    decoded_returns = [decode_return(record.value) for record in return_records]
    records = impression_records + return_records
    for record, event in zip(records, decoded_impressions + decoded_returns, strict=True):
        assert record.key == str(event.user_id).encode()
    assert sorted(decoded_impressions, key=event_key) == sorted(impressions, key=event_key)
    assert sorted(decoded_returns, key=event_key) == sorted(returns, key=event_key)
    # Records are read partition by partition in offset order; each user's records must sit on
    # one partition in the replay's order.
    for sent, received, topic_records in (
        (impressions, decoded_impressions, impression_records),
        (returns, decoded_returns, return_records),
    ):
        assert ids_by_user(received) == ids_by_user(sent)
        partitions = defaultdict(set)
        for record, event in zip(topic_records, received, strict=True):
            partitions[event.user_id].add(record.partition)
        assert all(len(used) == 1 for used in partitions.values())


def event_key(event: Impression | Return) -> str:
    return event.event_id


def ids_by_user(events: list) -> dict[int, list[str]]:
    ids = defaultdict(list)
    for event in events:
        ids[event.user_id].append(event.event_id)
    return dict(ids)


def test_replay_missing_topic(broker_settings):
    with pytest.raises(
        ReplayError, match=f"topic {broker_settings.topic_prefix}impressions not found"
    ):
        replay(broker_settings, limit=10, progress=False, producer_config={"max_block_ms": 2000})


def test_replay_speed_paces_sends(broker_settings, tmp_path):
    settings = broker_settings
    create_topics(settings)
    folder = tmp_path / "paced"
    folder.mkdir()
    lines = [line(1, 10, T), line(2, 20, T + 1000), line(1, 11, T + 2000)]
    (folder / "log_standard_paced.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    started = time.monotonic()
    report = replay(dataclasses.replace(settings, data_dir=folder), speed=4, progress=False)
    # Two seconds of event time at 4 times real time take at least half a second.
    assert time.monotonic() - started >= 0.5
    assert report.impressions == 3
    assert report.returns == 2


def test_failed_send_names_topic_and_event(broker_settings):
    settings = broker_settings
    create_topics(settings)
    # Every record is larger than 100 bytes, so the client rejects the first send, a return.
    with pytest.raises(ReplayError) as caught:
        replay(settings, limit=5, progress=False, producer_config={"max_request_size": 100})
    message = str(caught.value)
    assert f"to topic {settings.topic_prefix}returns failed after 0 acknowledged" in message
    assert "sending event return:" in message
