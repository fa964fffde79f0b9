"""Trainer faults on real parts: killed checkpoint writes, broken policy updates, killed workers."""

from __future__ import annotations

import dataclasses

import pytest

from sec_online.policy import encode_update
from sec_online.reliability import reset_scenario, scenario_settings, start_worker
from sec_online.settings import Settings
from sec_online.trainerfaults import (
    bad_update_records,
    kill_checkpoint_writer,
    make_update,
    publish_updates,
    rejection_reasons,
    run_trainer_killed,
    wait_served,
)
from state.checkpoints import CheckpointStore

# A killed worker's Faust group membership expires after 10 s instead of 60 s (read by Faust).
SESSION_TIMEOUT_S = "10"
TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def base_settings(clustered_settings) -> Settings:
    return clustered_settings("trainer-faults-work", partitions=1)


def test_checkpoint_writer_killed(tmp_path):
    folder = tmp_path / "checkpoints"
    result = kill_checkpoint_writer(folder, seed=3, kills=4)
    kills = result["kills"]
    assert result["failures"] == []
    assert len(kills) == 4
    for outcome in kills:
        assert outcome["found"] >= outcome["reported"]
    # Each restarted writer went on from the version it found, so versions only grew.
    found = [outcome["found"] for outcome in kills]
    assert found == sorted(found)
    assert len(set(found)) == len(found)
    with CheckpointStore(folder) as store:
        assert store.load_latest()[0] == found[-1]


def test_bad_updates_rejected(kafka_bootstrap, base_settings, topic_prefix, free_ports):
    (port,) = free_ports(1)
    settings = scenario_settings(
        dataclasses.replace(base_settings, bootstrap_servers=kafka_bootstrap),
        topic_prefix,
        "bad_updates",
        port,
    )
    reset_scenario(settings, base_settings.work_dir / "clusters")
    first, second = make_update(settings, 1, seed=1), make_update(settings, 2, seed=2)
    bad = bad_update_records(second)
    worker, _ = start_worker(settings, "worker.log")
    try:
        publish_updates(settings, [encode_update(first)])
        wait_served(worker, 1, 0, TIMEOUT_S)
        # Broken versions of update 2, then update 1 again, which is valid but not newer.
        publish_updates(settings, [value for value, _ in bad.values()] + [encode_update(first)])
        served = wait_served(worker, 1, len(bad), TIMEOUT_S)
        recommendation = worker.get("/recommend/1/", timeout_s=60.0)
        publish_updates(settings, [encode_update(second)])
        after = wait_served(worker, 2, len(bad), TIMEOUT_S)
        recommendation_after = worker.get("/recommend/1/", timeout_s=60.0)
    finally:
        worker.stop()
    assert served["invalid_updates"] == len(bad)
    assert served["samples_seen"] == first.samples_seen
    assert recommendation["version"] == 1
    assert after["invalid_updates"] == len(bad)
    assert recommendation_after["version"] == 2
    assert rejection_reasons(worker.log_file) == [reason for _, reason in bad.values()]


def test_bad_update_reasons_distinct(base_settings):
    bad = bad_update_records(make_update(base_settings, 5))
    assert sorted(bad) == ["altered_weights", "truncated", "unloadable_weights", "wrong_checksum"]
    assert len({value for value, _ in bad.values()}) == len(bad)


def test_worker_killed_while_publishing(
    kafka_bootstrap, base_settings, topic_prefix, free_ports, monkeypatch
):
    monkeypatch.setenv("BROKER_SESSION_TIMEOUT", SESSION_TIMEOUT_S)
    (port,) = free_ports(1)
    settings = dataclasses.replace(base_settings, bootstrap_servers=kafka_bootstrap)
    result = run_trainer_killed(settings, topic_prefix, seed=0, web_port=port, timeout_s=TIMEOUT_S)
    details = result["details"]
    assert details["failures"] == []
    assert details["passed"]
    assert result["lost"] == 0
    assert result["applied_twice"] == 0
    assert result["applied"] == result["published"]
    assert result["dead_lettered"] == 0
    assert len(details["kills"]) == 2
    versions = details["topic_versions"]
    assert versions == sorted(set(versions))
    assert details["served_version"] == versions[-1]
    for kill in details["kills"]:
        assert kill["served_after_restart"] >= kill["served_before"]
        assert kill["restored"][0][0] == str(kill["checkpoint"]["version"])
    assert result["recovery_seconds"] is not None
