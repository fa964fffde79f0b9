"""End to end on the real broker: a slice of the real log through a worker process.

The slice is every row of a few dozen users over the ten days, so they have many sessions and
returns. Each user's final state is checked against the pandas reference computed directly from
the same rows, and the newest policy update is loaded and served.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import urllib.error
from pathlib import Path

import pandas as pd
import pytest
from kafka import KafkaProducer

from sec_online import topics
from sec_online.clusters import build_clusters
from sec_online.data import find_logs
from sec_online.kafka_admin import read_all
from sec_online.levels import even_boundaries, level_of
from sec_online.policy import Policy, decode_update
from sec_online.reference import reference_user_state
from sec_online.replay import load_slice, replay
from sec_online.runtime import changelog_topic, create_topics
from sec_online.settings import Settings
from sec_online.userstate import UserStateMachine
from sec_online.workerproc import WorkerProcess, wait_processed

pytestmark = pytest.mark.broker

USERS_IN_SLICE = 40
BAD_RECORDS = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def slice_file(kuairand_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row of USERS_IN_SLICE users with 30 to 200 rows each, as a gzip CSV."""
    log_path = find_logs(kuairand_dir)[0]
    log = pd.read_csv(log_path)
    per_user = log.groupby("user_id").size()
    chosen = per_user[(per_user >= 30) & (per_user <= 200)].sort_index().index[:USERS_IN_SLICE]
    path = tmp_path_factory.mktemp("slice") / "log_standard_slice.csv.gz"
    log[log["user_id"].isin(chosen)].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pipeline(kafka_bootstrap, slice_file, tmp_path_factory):
    """Run a worker over the replayed slice; yields settings, worker, replay report, stats."""
    prefix = f"e2e-{free_port()}-"
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        app_id=prefix + "app",
        work_dir=tmp_path_factory.mktemp("work"),
        web_port=free_port(),
        partitions=3,
        publish_every_samples=100,
        publish_every_seconds=1.0,
    )
    create_topics(settings)
    worker = WorkerProcess(settings, settings.work_dir / "worker.log").start()
    try:
        worker.wait_healthy()
        report = replay(settings, [slice_file], progress=False)
        bad = _publish_bad_records(settings)
        stats = wait_processed(worker, report.impressions + bad, report.returns, 300.0)
        yield settings, worker, report, stats
    finally:
        worker.stop()


def _publish_bad_records(settings: Settings) -> int:
    """Send records that must be dead-lettered; returns how many."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, max_request_size=2**21)
    bad = [
        b"\xff\xfe not json",
        b'{"schema": "impression/1", "user_id": 1}',
        b"[1, 2]",
        # Nested deeper than Python's recursion limit: the decoder raises RecursionError.
        b"[" * 100_000 + b"]" * 100_000,
        # Over the schema's size limit, and its dead letter over Kafka's default 1 MB.
        b" " * 1_000_100,
    ]
    for value in bad:
        producer.send(settings.topic(topics.IMPRESSIONS), key=b"1", value=value).get(30)
    producer.close()
    return len(bad)


def test_every_event_consumed(pipeline):
    _, _, report, stats = pipeline
    assert stats["consumed"]["impressions"] == report.impressions + BAD_RECORDS
    assert stats["applied"]["impressions"] == report.impressions
    assert stats["applied"]["returns"] == report.returns
    assert stats["duplicates"] == {}


def test_bad_records_dead_lettered(pipeline):
    settings, _, _, stats = pipeline
    assert stats["dead_letters_total"] == BAD_RECORDS
    records = read_all(settings.bootstrap, settings.topic(topics.DEAD_LETTERS))
    letters = [json.loads(r.value) for r in records]
    reasons = sorted(letter["reason"] for letter in letters)
    assert reasons == ["missing_field", "not_object", "too_large", "undecodable", "undecodable"]
    by_reason = {letter["reason"]: letter for letter in letters}
    assert base64.b64decode(by_reason["not_object"]["value_b64"]) == b"[1, 2]"
    assert by_reason["not_object"]["value_truncated"] is False
    large = by_reason["too_large"]
    assert large["value_bytes"] == 1_000_100
    assert len(base64.b64decode(large["value_b64"])) == 1_000_100


def test_states_stored_in_their_users_partitions(pipeline):
    # A batch spans partitions, and each user's state must go to the changelog partition of the
    # user's own events, where a worker owning that partition restores it from.
    settings, _, _, stats = pipeline
    # Every user's first session opens with a return; the bad records went to impressions only.
    source = read_all(settings.bootstrap, settings.topic(topics.RETURNS))
    partition_of = {r.key: r.partition for r in source}
    changelog = read_all(settings.bootstrap, changelog_topic(settings))
    assert {r.key for r in changelog} == set(partition_of)
    misplaced = [(r.key, r.partition) for r in changelog if r.partition != partition_of[r.key]]
    assert misplaced == []
    # One changelog record per user and batch, so at most one per event.
    assert len(changelog) <= stats["applied"]["impressions"] + stats["applied"]["returns"]
    assert len({r.partition for r in changelog}) == settings.partitions


def test_user_states_match_reference(pipeline, slice_file):
    settings, worker, _, _ = pipeline
    rows, returns = load_slice(settings, [slice_file])
    clusters = build_clusters(settings)
    expected = reference_user_state(rows, returns, clusters, settings)
    assert len(expected) == USERS_IN_SLICE
    for user_id, want in expected.items():
        got = worker.get(f"/users/{user_id}/")
        for key in ("impressions", "sessions", "closed_sessions", "returns", "last_gap_ms"):
            assert got[key] == want[key], (user_id, key)
        assert got["signal_totals"] == list(want["signal_totals"]), user_id
        assert got["unknown_videos"] == want["unknown_videos"], user_id
        assert got["samples"] == want["samples"], user_id
        if want["retention_score"] is None:
            assert got["retention_score"] is None
        else:
            assert got["retention_score"] == pytest.approx(want["retention_score"], rel=1e-9)
        history = got["history"]
        assert history["impressions"] == pytest.approx(want["history_impressions"])
        assert history["watch"] == pytest.approx(want["history_watch"])
        assert history["signals"] == pytest.approx(list(want["history_signals"]))
        assert list(got["open"]) == [str(want["open_session_id"])], user_id


def test_levels_follow_published_boundaries(pipeline):
    settings, worker, _, stats = pipeline
    updates = {
        update.version: update
        for update in (
            decode_update(r.value)
            for r in read_all(settings.bootstrap, settings.topic(topics.POLICY_UPDATES))
        )
    }
    assert len(updates) == stats["trainer"]["version"]
    boundaries = {0: even_boundaries(settings.levels)}
    boundaries.update({v: list(u.boundaries) for v, u in updates.items()})
    rated = 0
    for user_id in _user_ids(worker):
        state = worker.get(f"/users/{user_id}/")
        if state["retention_score"] is None:
            assert state["level"] is None
            continue
        rated += 1
        used = boundaries[state["boundaries_version"]]
        assert state["level"] == level_of(state["retention_score"], used), user_id
    assert rated > 0


def _user_ids(worker: WorkerProcess) -> list[int]:
    stats = worker.get("/stats/?exact=1")
    assert stats["table"]["users"] == USERS_IN_SLICE
    return [int(key) for key in _reference_ids(worker)]


def _reference_ids(worker: WorkerProcess) -> list[str]:
    ids = []
    for record in read_all(worker.settings.bootstrap, worker.settings.topic(topics.RETURNS)):
        ids.append(record.key.decode())
    return sorted(set(ids))


def test_samples_and_training(pipeline):
    _, _, _, stats = pipeline
    assert stats["samples_emitted"] > 100
    assert stats["trainer"]["samples_consumed"] == stats["samples_emitted"]
    assert stats["trainer"]["steps"] > 0
    assert stats["trainer"]["version"] >= 2


def test_policy_update_served(pipeline):
    settings, worker, _, stats = pipeline
    records = read_all(settings.bootstrap, settings.topic(topics.POLICY_UPDATES))
    newest = decode_update(records[-1].value)
    assert newest.version == stats["trainer"]["version"]
    policy = Policy.from_update(newest)
    machine = UserStateMachine(settings.clusters, build_clusters(settings).cluster_of, 0.3)
    user_id = stats["table"]["most_active_user"]
    state = worker.get(f"/users/{user_id}/")
    local = policy.recommend(machine.features(state), machine.historical_level(state), top_k=5)
    served = worker.get(f"/recommend/{user_id}/")
    assert served["version"] == newest.version
    assert served["level"] == local.level
    assert [pair[0] for pair in served["actions"]] == [pair[0] for pair in local.actions]
    probabilities = [pair[1] for pair in served["actions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 <= served["level"] <= served["historical_level"]


def test_recommend_command(pipeline, capsys):
    from sec_online.cli import main

    settings, worker, _, stats = pipeline
    user_id = stats["table"]["most_active_user"]
    assert main(["recommend", str(user_id), "--url", worker.base_url, "--top", "3"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["user_id"] == user_id
    assert body["version"] == stats["trainer"]["version"]
    assert len(body["actions"]) == 3


def test_recommend_invalid_user(pipeline):
    _, worker, _, _ = pipeline
    for path in (
        "/recommend/not-a-user/",
        "/recommend/0712/",
        "/users/abc/",
        "/recommend/7/?top=0",
    ):
        with pytest.raises(urllib.error.HTTPError) as error:
            worker.get(path)
        assert error.value.code == 400, path
