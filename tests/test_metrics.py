"""Prometheus metrics: the collector on its own, then ``/metrics`` of a real worker after a replay.

The worker test compares every scraped value with ``/stats/`` read just before and after the
scrape, and the consumer lag with the offsets the replay actually wrote.
"""

from __future__ import annotations

import dataclasses
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from sec_online import topics
from sec_online.data import find_logs
from sec_online.replay import replay
from sec_online.runtime import create_topics
from sec_online.settings import Settings
from sec_online.workerproc import WorkerProcess, wait_processed
from streams.dashboard import level_shares
from streams.metrics import (
    RECENT_RECOMMENDATIONS,
    RECENT_USERS,
    TRAINING_RATE_WINDOW_SECONDS,
    PrometheusMetrics,
    WorkerMetrics,
    partition_lag,
)

USERS_IN_SLICE = 15
DUPLICATE_ROWS = 30
RECOMMEND_CALLS = 12
BAD_RECORDS = [b"\xff\xfe not json", b"[1, 2]"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _parse(text: str) -> dict[str, Any]:
    """Metric families of a scrape by name (counters without their ``_total`` suffix)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def _values(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """Sample values of a family keyed by their sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in family.samples
        if sample.name == family.name + suffix
    }


def _by_label(family: Any, label: str, suffix: str = "") -> dict[str, float]:
    return {dict(key)[label]: value for key, value in _values(family, suffix).items()}


def _single(family: Any, suffix: str = "") -> float | None:
    values = list(_values(family, suffix).values())
    assert len(values) <= 1, family.name
    return values[0] if values else None


# Collector and helpers, without a broker.


def _snapshot() -> dict[str, Any]:
    return {
        "consumed": {"impressions": 10, "returns": 4},
        "applied": {"impressions": 9, "returns": 4},
        "duplicates": {"impressions": 1},
        "dead_letters": {"undecodable": 2, "not_object": 1},
        "samples_emitted": 3,
        "users_per_level": {"unrated": 2, "0": 5, "2": 1},
        "recommendations": {"1": 4},
        "trainer": {
            "active": True,
            "samples_consumed": 3,
            "samples_per_second": 0.25,
            "steps": 7,
            "last_loss": 1.5,
            "version": 2,
        },
        "policy": {
            "version": 2,
            "age_seconds": 12.5,
            "boundaries": [0.2, 0.6],
            "invalid_updates": 3,
            "invalid_update_reasons": {"checksum_mismatch": 2, "undecodable": 1},
        },
        "consumer_lag": [
            {"topic": "p.impressions", "partition": 0, "end_offset": 8, "position": 5, "lag": 3},
            {"topic": "p.returns", "partition": 1, "end_offset": None, "position": 0, "lag": None},
        ],
    }


def _scrape(snapshot: dict[str, Any]) -> dict[str, Any]:
    prometheus = PrometheusMetrics(lambda: snapshot, lambda kind: "p." + kind)
    body, content_type = prometheus.exposition(None)
    assert content_type.startswith("text/plain")
    return _parse(body.decode())


def test_collector_counts_by_topic():
    families = _scrape(_snapshot())
    consumed = _by_label(families["sec_events_consumed"], "topic", "_total")
    assert consumed == {"p.impressions": 10, "p.returns": 4}
    duplicates = _by_label(families["sec_duplicate_events"], "topic", "_total")
    assert duplicates == {"p.impressions": 1}
    dead = _by_label(families["sec_dead_letters"], "reason", "_total")
    assert dead == {"undecodable": 2, "not_object": 1}
    assert _single(families["sec_samples_emitted"], "_total") == 3


def test_collector_levels_and_policy():
    families = _scrape(_snapshot())
    users = _by_label(families["sec_users"], "level")
    assert users == {"unrated": 2, "0": 5, "2": 1}
    bounds = _by_label(families["sec_level_min_retention_score"], "level")
    assert bounds == {"1": 0.2, "2": 0.6}
    assert _single(families["sec_policy_version"]) == 2
    assert _single(families["sec_policy_age_seconds"]) == 12.5
    assert _single(families["sec_trainer_loss"]) == 1.5
    invalid = _by_label(families["sec_policy_invalid_updates"], "reason", "_total")
    assert invalid == {"checksum_mismatch": 2, "undecodable": 1}
    assert _single(families["sec_trainer_steps"], "_total") == 7
    assert _single(families["sec_trainer_samples_per_second"]) == 0.25


def test_collector_lag_skips_unknown():
    families = _scrape(_snapshot())
    lag = _values(families["sec_consumer_lag_records"])
    assert lag == {(("partition", "0"), ("topic", "p.impressions")): 3}
    end = _values(families["sec_consumer_end_offset"])
    assert end == {(("partition", "0"), ("topic", "p.impressions")): 8}


def test_collector_omits_missing_loss_and_age():
    snapshot = _snapshot()
    snapshot["trainer"]["last_loss"] = None
    snapshot["policy"]["age_seconds"] = None
    families = _scrape(snapshot)
    assert _single(families["sec_trainer_loss"]) is None
    assert _single(families["sec_policy_age_seconds"]) is None


def test_every_family_has_help_and_unit():
    families = _scrape(_snapshot())
    for name, family in families.items():
        assert name.startswith("sec_"), name
        assert family.documentation, name
        assert family.type in {"counter", "gauge", "histogram"}, name
    assert families["sec_recommend_latency_seconds"].type == "histogram"


def test_openmetrics_on_request():
    prometheus = PrometheusMetrics(_snapshot, lambda kind: kind)
    body, content_type = prometheus.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_registries_are_separate():
    first = PrometheusMetrics(_snapshot, lambda kind: kind)
    second = PrometheusMetrics(_snapshot, lambda kind: kind)
    first.recommend_latency.observe(0.002)
    assert first.registry.get_sample_value("sec_recommend_latency_seconds_count") == 1
    assert second.registry.get_sample_value("sec_recommend_latency_seconds_count") == 0


@pytest.mark.parametrize(
    ("end_offset", "committed", "read", "expected"),
    [
        (10, 4, 8, {"end_offset": 10, "position": 4, "lag": 6}),
        (10, None, 8, {"end_offset": 10, "position": 9, "lag": 1}),
        (10, None, None, {"end_offset": 10, "position": None, "lag": None}),
        (None, 4, 3, {"end_offset": None, "position": 4, "lag": None}),
        (10, 10, 9, {"end_offset": 10, "position": 10, "lag": 0}),
        # A high watermark from an older fetch than the commit: never a negative lag.
        (10, 12, 11, {"end_offset": 10, "position": 12, "lag": 0}),
    ],
)
def test_partition_lag(end_offset, committed, read, expected):
    assert partition_lag(end_offset, committed, read) == expected


def test_samples_per_second_window():
    metrics = WorkerMetrics()
    start = metrics.started_monotonic
    metrics.record_trained(64, now=start + 100.0)
    metrics.record_trained(32, now=start + 110.0)
    window = TRAINING_RATE_WINDOW_SECONDS
    assert metrics.samples_per_second(now=start + 110.0) == pytest.approx(96 / window)
    # The first batch leaves the window, the second is still in it.
    assert metrics.samples_per_second(now=start + 100.0 + window + 1) == pytest.approx(32 / window)
    assert metrics.samples_per_second(now=start + 110.0 + window + 1) == 0.0


def test_samples_per_second_early_uses_uptime():
    metrics = WorkerMetrics()
    start = metrics.started_monotonic
    metrics.record_trained(10, now=start + 2.0)
    assert metrics.samples_per_second(now=start + 5.0) == pytest.approx(10 / 5.0)


def test_recent_users_bounded():
    metrics = WorkerMetrics()
    for user in range(RECENT_USERS + 10):
        metrics.touch_user(str(user).encode())
    metrics.touch_user(b"10")
    keys = list(metrics.recent_users)
    assert len(keys) == RECENT_USERS
    assert keys[0] == b"11"
    assert keys[-1] == b"10"


def test_recent_recommendations_bounded():
    metrics = WorkerMetrics()
    for _ in range(5):
        metrics.record_recommendation(2)
    for _ in range(RECENT_RECOMMENDATIONS):
        metrics.record_recommendation(0)
    stats = metrics.as_dict()
    assert stats["recommendations"] == {"2": 5, "0": RECENT_RECOMMENDATIONS}
    assert stats["recent_recommendations"] == {"0": RECENT_RECOMMENDATIONS}


def test_level_shares():
    assert level_shares({"0": 1, "2": 3}) == {
        "total": 4,
        "counts": {"0": 1, "2": 3},
        "shares": {"0": 0.25, "2": 0.75},
    }
    assert level_shares({}) == {"total": 0, "counts": {}, "shares": {}}


# A real worker after a replay.


@pytest.fixture(scope="module")
def slice_file(kuairand_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row of USERS_IN_SLICE users with 30 to 200 rows each, as a gzip CSV."""
    log = pd.read_csv(find_logs(kuairand_dir)[0])
    per_user = log.groupby("user_id").size()
    chosen = per_user[(per_user >= 30) & (per_user <= 200)].sort_index().index[:USERS_IN_SLICE]
    path = tmp_path_factory.mktemp("metrics-slice") / "log_standard_slice.csv.gz"
    log[log["user_id"].isin(chosen)].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def scraped(kafka_bootstrap, slice_file, tmp_path_factory):
    """Replay the slice, some rows twice and a few bad records; yields the worker and counts."""
    prefix = f"metrics-{_free_port()}-"
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        app_id=prefix + "app",
        work_dir=tmp_path_factory.mktemp("metrics-work"),
        web_port=_free_port(),
        partitions=2,
        publish_every_samples=50,
        publish_every_seconds=1.0,
    )
    create_topics(settings)
    worker = WorkerProcess(settings, settings.work_dir / "worker.log").start()
    try:
        worker.wait_healthy()
        first = replay(settings, [slice_file], progress=False)
        again = replay(settings, [slice_file], limit=DUPLICATE_ROWS, progress=False)
        _send_bad_records(settings)
        impressions = first.impressions + again.impressions + len(BAD_RECORDS)
        returns = first.returns + again.returns
        stats = wait_processed(worker, impressions, returns, 240.0)
        _wait_caught_up(worker)
        yield worker, {"impressions": impressions, "returns": returns, "table": stats["table"]}
    finally:
        worker.stop()


def _send_bad_records(settings: Settings) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap)
    for value in BAD_RECORDS:
        producer.send(settings.topic(topics.IMPRESSIONS), key=b"1", value=value).get(30)
    producer.close()


def _wait_caught_up(worker: WorkerProcess, timeout_s: float = 60.0) -> None:
    """Wait until every assigned source partition reports a lag of 0 (offsets committed)."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = worker.get("/stats/")["consumer_lag"]
        complete = len(rows) == 2 * worker.settings.partitions
        if complete and all(row["lag"] == 0 for row in rows):
            return
        time.sleep(0.5)
    raise AssertionError(f"consumer lag did not reach 0 within {timeout_s:.0f} s: {rows}")


def _get_metrics(worker: WorkerProcess) -> tuple[str, dict[str, Any]]:
    with urllib.request.urlopen(worker.base_url + "/metrics", timeout=10) as response:
        return response.headers["Content-Type"], _parse(response.read().decode())


def _stats_around_scrape(worker: WorkerProcess) -> tuple[dict, dict[str, Any], dict]:
    before = worker.get("/stats/")
    _, families = _get_metrics(worker)
    after = worker.get("/stats/")
    return before, families, after


def test_scrape_content_type(scraped):
    worker, _ = scraped
    content_type, families = _get_metrics(worker)
    assert content_type.startswith("text/plain; version=")
    assert "sec_events_consumed" in families


def test_scrape_events_match_stats(scraped):
    worker, published = scraped
    before, families, after = _stats_around_scrape(worker)
    assert before["consumed"] == after["consumed"], "events still arriving"
    topic = worker.settings.topic
    consumed = _by_label(families["sec_events_consumed"], "topic", "_total")
    assert consumed == {topic(kind): count for kind, count in before["consumed"].items()}
    assert consumed[topic("impressions")] == published["impressions"]
    assert consumed[topic("returns")] == published["returns"]
    applied = _by_label(families["sec_events_applied"], "topic", "_total")
    assert applied == {topic(kind): count for kind, count in before["applied"].items()}
    duplicates = _by_label(families["sec_duplicate_events"], "topic", "_total")
    assert duplicates == {topic(kind): count for kind, count in before["duplicates"].items()}
    assert duplicates[topic("impressions")] == DUPLICATE_ROWS
    dead = _by_label(families["sec_dead_letters"], "reason", "_total")
    assert dead == before["dead_letters"]
    assert sum(dead.values()) == len(BAD_RECORDS)
    assert _single(families["sec_samples_emitted"], "_total") == before["samples_emitted"]


def test_scrape_levels_match_table(scraped):
    worker, published = scraped
    before, families, _ = _stats_around_scrape(worker)
    users = _by_label(families["sec_users"], "level")
    assert users == before["users_per_level"]
    assert users == published["table"]["users_per_level"]
    assert sum(users.values()) == USERS_IN_SLICE
    bounds = _by_label(families["sec_level_min_retention_score"], "level")
    expected = {str(i + 1): b for i, b in enumerate(before["policy"]["boundaries"])}
    assert bounds == expected
    assert len(bounds) == worker.settings.levels - 1


def test_scrape_trainer_and_policy(scraped):
    worker, _ = scraped
    before, families, after = _stats_around_scrape(worker)
    trainer = before["trainer"]
    assert trainer["active"] is True
    assert trainer["version"] >= 1
    assert _single(families["sec_trainer_steps"], "_total") == trainer["steps"] > 0
    assert _single(families["sec_trainer_loss"]) == trainer["last_loss"]
    assert _single(families["sec_trainer_samples"], "_total") == trainer["samples_consumed"]
    assert _single(families["sec_trainer_published_version"]) == trainer["version"]
    assert _single(families["sec_policy_version"]) == before["policy"]["version"]
    assert before["policy"]["version"] == trainer["version"]
    # Age grows and the training rate only falls while nothing new arrives.
    age = _single(families["sec_policy_age_seconds"])
    assert before["policy"]["age_seconds"] <= age <= after["policy"]["age_seconds"]
    rate = _single(families["sec_trainer_samples_per_second"])
    assert after["trainer"]["samples_per_second"] <= rate
    assert rate <= trainer["samples_per_second"]


def test_scrape_lag_matches_offsets(scraped):
    worker, published = scraped
    before, families, _ = _stats_around_scrape(worker)
    lag = _values(families["sec_consumer_lag_records"])
    assert len(lag) == 2 * worker.settings.partitions
    assert set(lag.values()) == {0.0}
    expected = {
        (("partition", str(row["partition"])), ("topic", row["topic"])): row["end_offset"]
        for row in before["consumer_lag"]
    }
    end = _values(families["sec_consumer_end_offset"])
    assert end == expected
    # Each source topic was new, so its end offsets add up to the records written to it.
    per_topic: Counter[str] = Counter()
    for labels, offset in end.items():
        per_topic[dict(labels)["topic"]] += int(offset)
    assert per_topic[worker.settings.topic("impressions")] == published["impressions"]
    assert per_topic[worker.settings.topic("returns")] == published["returns"]


def test_scrape_recommend_latency(scraped):
    worker, published = scraped
    user_id = published["table"]["most_active_user"]
    levels: Counter[str] = Counter()
    for _ in range(RECOMMEND_CALLS):
        levels[str(worker.get(f"/recommend/{user_id}/")["level"])] += 1
    with pytest.raises(urllib.error.HTTPError):
        worker.get("/recommend/0712/")
    before, families, _ = _stats_around_scrape(worker)
    histogram = families["sec_recommend_latency_seconds"]
    assert _single(histogram, "_count") == RECOMMEND_CALLS
    assert 0 < _single(histogram, "_sum") < RECOMMEND_CALLS * 2.5
    buckets = _by_label(histogram, "le", "_bucket")
    assert buckets["+Inf"] == RECOMMEND_CALLS
    served = _by_label(families["sec_recommendations"], "level", "_total")
    assert served == before["recommendations"] == dict(levels)
    assert before["recent_recommendations"] == dict(levels)
