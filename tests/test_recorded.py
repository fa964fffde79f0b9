"""Reading the recorded impressions topic back gives the replayed log rows exactly."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from kafka import KafkaProducer

from sec_online import topics
from sec_online.evaluation.recorded import LOG_COLUMNS, read_recorded
from sec_online.kafka_admin import read_all
from sec_online.replay import load_slice, replay
from sec_online.runtime import create_topics
from sec_online.settings import Settings

START_MS = 1_651_075_200_000  # 2022-04-28 00:00 UTC
ROWS = 3_000


@pytest.fixture
def recorded_settings(kuairand_dir, kafka_bootstrap, topic_prefix, tmp_path):
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        work_dir=tmp_path,
        partitions=3,
    )
    create_topics(settings)
    replay(settings, start_ms=START_MS, limit=ROWS, progress=False)
    return settings


def test_rows_equal_replayed_slice(recorded_settings):
    recorded = read_recorded(recorded_settings)
    rows, _ = load_slice(recorded_settings, start_ms=START_MS, limit=ROWS)
    expected = rows[list(LOG_COLUMNS.values())].reset_index(drop=True)
    got = recorded.log[list(LOG_COLUMNS.values())]
    assert len(got) == ROWS
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)


def test_offsets_recorded(recorded_settings):
    recorded = read_recorded(recorded_settings)
    impressions = recorded.offsets[recorded_settings.topic(topics.IMPRESSIONS)]
    assert sum(end - start for start, end in impressions.values()) == ROWS
    assert set(recorded.offsets) == {
        recorded_settings.topic(name)
        for name in (topics.IMPRESSIONS, topics.RETURNS, topics.SAMPLES)
    }


def test_offset_range_and_time_range(recorded_settings):
    full = read_recorded(recorded_settings).log
    first_half = read_recorded(recorded_settings, end={0: 100, 1: 100, 2: 100})
    assert len(first_half.log) == 300
    cut = int(full["time_ms"].iloc[1000])
    early = read_recorded(recorded_settings, end_ms=cut)
    assert len(early.log) == int((full["time_ms"] < cut).sum())
    assert early.out_of_range == ROWS - len(early.log)


def test_invalid_and_duplicate_skipped(recorded_settings):
    name = recorded_settings.topic(topics.IMPRESSIONS)
    original = read_all(recorded_settings.bootstrap, name)[0]
    producer = KafkaProducer(bootstrap_servers=recorded_settings.bootstrap)
    producer.send(name, key=b"1", value=b"not json").get(30)
    producer.send(name, key=original.key, value=original.value).get(30)
    producer.close()
    again = read_recorded(recorded_settings)
    assert again.invalid == 1
    assert again.duplicates == 1
    assert len(again.log) == ROWS
