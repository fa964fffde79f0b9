"""Fault scenarios on the real broker: no event lost, none applied twice, invalid records kept.

Each test runs one scenario of ``sec_online.reliability`` on a slice of the real log (every row
of 30 users) through a worker process, and checks the dumped states against the pandas
reference. The scenario logic is in the library so that ``sec-online reliability`` runs the
same checks.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import UTC, datetime

import pytest

from sec_online.reliability import (
    LogSlice,
    ScenarioResult,
    build_slice,
    compare_state,
    expected_garbage_reasons,
    pause_start,
    rebalance_lines,
    run_scenario,
    score_states,
)
from sec_online.settings import Settings
from sec_online.workerproc import WorkerProcess

USERS = 30
# Faust reads this variable from the environment. A killed worker's group membership then
# expires after 10 s instead of Faust's default 60 s, so each restart is rebalanced sooner.
SESSION_TIMEOUT_S = "10"


@pytest.fixture(scope="module")
def base_settings(clustered_settings, tmp_path_factory) -> Settings:
    reports = tmp_path_factory.mktemp("reliability-reports")
    return clustered_settings("reliability-work", reports_dir=reports, partitions=3)


@pytest.fixture(scope="module")
def log_slice(base_settings: Settings) -> LogSlice:
    return build_slice(base_settings, USERS)


@pytest.fixture
def run(kafka_bootstrap, base_settings, log_slice, topic_prefix, free_ports, monkeypatch):
    monkeypatch.setenv("BROKER_SESSION_TIMEOUT", SESSION_TIMEOUT_S)
    settings = dataclasses.replace(base_settings, bootstrap_servers=kafka_bootstrap)

    def run_one(name: str) -> ScenarioResult:
        (port,) = free_ports(1)
        return run_scenario(
            settings, log_slice, name, prefix=topic_prefix, seed=0, web_port=port, timeout_s=180
        )

    return run_one


def _assert_exact(result: ScenarioResult, log_slice: LogSlice) -> None:
    assert result.lost == 0
    assert result.applied_twice == 0
    assert result.users_over_reference == []
    assert result.mismatching_users == {}
    assert result.applied == result.expected
    assert result.expected == sum(
        e["impressions"] + e["returns"] for e in log_slice.expected.values()
    )
    assert result.checks["served_states_differing_from_changelog"] == []
    assert result.checks["records_in_source_topics"] == result.published
    assert result.failures == []
    assert result.passed


def test_slice_has_every_user(log_slice):
    assert len(log_slice.user_ids) == USERS
    assert sorted(log_slice.expected) == log_slice.user_ids
    assert len(log_slice.events) > 1000


@pytest.mark.slow
def test_sigkill_three_times(run, log_slice):
    result = run("sigkill")
    _assert_exact(result, log_slice)
    assert len(result.restarts) == 3
    assert result.dead_lettered == 0
    assert result.published == len(log_slice.events)
    assert result.recovery_seconds is not None


def test_sigterm_restart(run, log_slice):
    result = run("sigterm")
    _assert_exact(result, log_slice)
    assert len(result.restarts) == 1
    assert result.checks["exit_codes"] == [0]
    assert result.dead_lettered == 0


def test_duplicates_and_garbage(run, log_slice):
    result = run("duplicates_and_garbage")
    _assert_exact(result, log_slice)
    assert result.duplicates_published > 0
    assert result.duplicates_detected == result.duplicates_published
    reasons = Counter(expected_garbage_reasons())
    assert result.dead_letter_reasons == dict(reasons)
    assert result.dead_lettered == len(expected_garbage_reasons())
    published = len(log_slice.events) + result.duplicates_published + result.dead_lettered
    assert result.published == published


def test_rocksdb_deleted(run, log_slice):
    result = run("rocksdb_deleted")
    _assert_exact(result, log_slice)
    assert result.checks["deleted_folders"]
    assert result.checks["users_in_changelog_at_stop"] > 0
    assert result.checks["last_record_users_wrong"] == []
    assert result.checks["users_in_table"] == USERS
    assert result.dead_lettered == 0


@pytest.mark.slow
def test_rebalance_join_and_leave(run, log_slice):
    result = run("rebalance")
    _assert_exact(result, log_slice)
    assert result.published == len(log_slice.events)
    assert result.dead_lettered == 0
    assert result.checks["exit_codes"] == [0]
    owned = result.checks["partitions_owned"]
    assert owned["first"] == [0, 1, 2]
    assert owned["second"] == [0, 1, 2]
    assert result.checks["workers_without_partitions"] == []
    assert [restart["after"].split()[0] for restart in result.restarts] == ["second", "first"]
    times = [restart["recovery_seconds"] for restart in result.restarts]
    assert all(seconds > 0 for seconds in times)
    assert result.recovery_seconds == max(times)


@pytest.mark.slow
def test_broker_restart(run, log_slice):
    result = run("broker_restart")
    _assert_exact(result, log_slice)
    assert result.published == len(log_slice.events)
    assert result.dead_lettered == 0
    assert len(result.restarts) == 1
    assert result.recovery_seconds is not None
    warnings = result.checks["replay_warnings"]
    assert any("unreachable" in warning for warning in warnings), warnings


def test_rebalance_lines_parsed(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text(
        "2026-12-04 17:20:29,131 INFO sec_online.runtime: starting worker\n"
        "[2026-12-04 17:20:30,100] [7] [INFO] rebalance started topic=p.impressions "
        "revoked_partitions=[]\n"
        "2026-12-04 17:20:30,247 INFO streams.app: rebalance complete topic=p.returns "
        "partitions=[0, 1] [worker=w@127.0.0.1:1]\n"
        "2026-12-04 17:20:30,250 INFO streams.app: rebalance complete topic=p.impressions "
        "partitions=[0, 2] [worker=w@127.0.0.1:1]\n"
        '{"time": "2026-12-04T17:20:31.000Z", "level": "INFO", "component": "streams.app", '
        '"message": "rebalance complete topic=p.impressions partitions=[1]"}\n'
        "{not json\n"
    )
    lines = rebalance_lines(log, "p.impressions")
    assert [line.kind for line in lines] == ["started", "complete", "complete"]
    assert [line.partitions for line in lines] == [(), (0, 2), (1,)]
    assert lines[1].time_s - lines[0].time_s == pytest.approx(0.15, abs=1e-6)
    utc = datetime(2026, 12, 4, 17, 20, 31, tzinfo=UTC).timestamp()
    assert lines[2].time_s == utc
    assert rebalance_lines(tmp_path / "missing.log", "p.impressions") == []


def test_pause_starts_at_revocation(tmp_path):
    joining, owning = tmp_path / "joining.log", tmp_path / "owning.log"
    joining.write_text(
        "2026-12-04 17:20:30,000 INFO streams.app: rebalance started topic=p.impressions "
        "revoked_partitions=[]\n"
    )
    owning.write_text(
        "2026-12-04 17:20:29,000 INFO streams.app: rebalance started topic=p.impressions "
        "revoked_partitions=[1]\n"
        "2026-12-04 17:20:32,500 INFO streams.app: rebalance started topic=p.impressions "
        "revoked_partitions=[0, 1, 2]\n"
    )
    settings = Settings.from_env()
    workers = [WorkerProcess(settings, joining), WorkerProcess(settings, owning)]
    since = rebalance_lines(joining, "p.impressions")[0].time_s
    assert pause_start(workers, "p.impressions", since) == since + 2.5
    assert pause_start(workers[:1], "p.impressions", since) == since


def _reference_like(state: dict) -> dict:
    return {
        "impressions": state["impressions"],
        "sessions": state["sessions"],
        "closed_sessions": state["closed_sessions"],
        "returns": state["returns"],
        "last_gap_ms": state["last_gap_ms"],
        "unknown_videos": state["unknown_videos"],
        "samples": state["samples"],
        "signal_totals": list(state["signal_totals"]),
        "retention_score": state["retention_score"],
        "history_impressions": state["history"]["impressions"],
        "history_watch": state["history"]["watch"],
        "history_signals": list(state["history"]["signals"]),
        "open_session_id": int(next(iter(state["open"]))),
    }


def _state(user_id: int, impressions: int, returns: int) -> dict:
    return {
        "user_id": user_id,
        "impressions": impressions,
        "returns": returns,
        "duplicates": 0,
        "sessions": 2,
        "closed_sessions": 1,
        "last_gap_ms": 5000,
        "unknown_videos": 0,
        "samples": 1,
        "signal_totals": [1, 0, 0, 0, 0, 0, 0],
        "retention_score": 0.5,
        "history": {"impressions": 3.0, "watch": 1.2, "signals": [1.0] + [0.0] * 6},
        "open": {"1650000000000": {}},
    }


def test_score_counts_loss_and_excess_apart():
    want = {1: _reference_like(_state(1, 5, 2)), 2: _reference_like(_state(2, 5, 2))}
    got = [_state(1, 4, 2), _state(2, 6, 2)]
    result = ScenarioResult(name="unit")
    score_states(result, got, want)
    assert result.lost == 1
    assert result.applied_twice == 1
    assert result.applied == result.expected
    assert result.users_over_reference == [2]
    assert result.mismatching_users == {"1": ["impressions"], "2": ["impressions"]}


def test_score_missing_user_lost():
    want = {1: _reference_like(_state(1, 5, 2)), 2: _reference_like(_state(2, 3, 1))}
    result = ScenarioResult(name="unit")
    score_states(result, [_state(1, 5, 2)], want)
    assert result.lost == 4
    assert result.mismatching_users == {"2": ["missing_from_dump"]}


def test_compare_state_fields():
    state = _state(1, 5, 2)
    want = _reference_like(state)
    assert compare_state(state, want) == []
    changed = {**state, "history": {**state["history"], "watch": 1.3}, "open": {"1": {}}}
    assert compare_state(changed, want) == ["history_watch", "open_session_id"]
    assert compare_state({**state, "retention_score": None}, want) == ["retention_score"]
