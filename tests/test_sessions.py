"""Session rule, return derivation and prior activity, on hand-written rows and the shipped log."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sec_online.data import find_logs, read_last_seen, read_log
from sec_online.sessions import (
    RETURN_COLUMNS,
    assign_sessions,
    calendar_day,
    derive_returns,
    prior_activity_for,
)
from sec_online.settings import Settings

MINUTE = 60_000
HOUR = 60 * MINUTE
# 2022-04-26 00:00 UTC; local midnight (UTC+8) falls at 16:00 UTC.
DAY_START = 1_650_931_200_000
LOCAL_MIDNIGHT = DAY_START + 16 * HOUR
SETTINGS = Settings(data_dir=None)


def rows(*pairs: tuple[int, int]) -> pd.DataFrame:
    """Log rows from (user_id, time_ms) pairs, with a row count column."""
    users, times = zip(*pairs, strict=True)
    return pd.DataFrame({"user_id": users, "time_ms": times, "row": range(len(pairs))})


def sessions_of(log: pd.DataFrame, settings: Settings = SETTINGS) -> list[int]:
    return assign_sessions(log, settings)["session_id"].tolist()


def test_idle_limit_is_exclusive():
    t = DAY_START
    log = rows((1, t), (1, t + 30 * MINUTE), (1, t + 60 * MINUTE + 1))
    assert sessions_of(log) == [t, t, t + 60 * MINUTE + 1]


def test_idle_minutes_setting():
    t = DAY_START
    log = rows((1, t), (1, t + 11 * MINUTE))
    assert sessions_of(log) == [t, t]
    short = dataclasses.replace(SETTINGS, session_idle_minutes=10)
    assert sessions_of(log, short) == [t, t + 11 * MINUTE]


def test_local_midnight_splits():
    before, after = LOCAL_MIDNIGHT - MINUTE, LOCAL_MIDNIGHT + MINUTE
    assert sessions_of(rows((1, before), (1, after))) == [before, after]
    utc = dataclasses.replace(SETTINGS, day_offset_hours=0)
    assert sessions_of(rows((1, before), (1, after)), utc) == [before, before]


def test_utc_midnight_does_not_split():
    before, after = DAY_START - 5 * MINUTE, DAY_START + 5 * MINUTE
    assert sessions_of(rows((1, before), (1, after))) == [before, before]


def test_calendar_day_offset():
    assert calendar_day(LOCAL_MIDNIGHT - 1, 8) + 1 == calendar_day(LOCAL_MIDNIGHT, 8)
    assert calendar_day(DAY_START - 1, 8) == calendar_day(DAY_START, 8)
    assert calendar_day(DAY_START - 1, 0) + 1 == calendar_day(DAY_START, 0)


def test_same_time_rows_one_request():
    t = DAY_START
    # Three rows of one request, then one 20 minutes later: the idle time is measured from the
    # request, not from each row, and the rows of a request never split.
    log = rows((1, t), (1, t), (1, t), (1, t + 20 * MINUTE), (1, t + 51 * MINUTE))
    assert sessions_of(log) == [t, t, t, t, t + 51 * MINUTE]


def test_users_are_independent_and_order_kept():
    t = DAY_START
    log = rows((2, t + 40 * MINUTE), (1, t), (2, t), (1, t + 40 * MINUTE), (1, t + 41 * MINUTE))
    result = assign_sessions(log.set_index(pd.Index([50, 40, 30, 20, 10])), SETTINGS)
    assert result.index.tolist() == [50, 40, 30, 20, 10]
    assert result["row"].tolist() == [0, 1, 2, 3, 4]
    assert result["session_id"].tolist() == [
        t + 40 * MINUTE,
        t,
        t,
        t + 40 * MINUTE,
        t + 40 * MINUTE,
    ]


def test_empty_log():
    empty = pd.DataFrame({"user_id": pd.Series([], dtype="int64"), "time_ms": []})
    with_sessions = assign_sessions(empty, SETTINGS)
    assert with_sessions["session_id"].tolist() == []
    returns = derive_returns(with_sessions, SETTINGS, {})
    assert list(returns.columns) == list(RETURN_COLUMNS)
    assert returns.empty


def test_returns_of_hand_written_sessions():
    t = DAY_START
    log = rows(
        (1, t),
        (1, t),
        (2, t + MINUTE),
        (1, t + 10 * MINUTE),
        (1, t + 2 * HOUR),
        (2, t + 3 * HOUR),
        (1, t + 3 * HOUR),
    )
    returns = derive_returns(assign_sessions(log, SETTINGS), SETTINGS, {2: t - HOUR})
    assert list(returns.columns) == list(RETURN_COLUMNS)
    assert returns["time_ms"].is_monotonic_increasing
    by_session = {(row.user_id, row.session_id): row for row in returns.itertuples(index=False)}
    assert len(by_session) == 5

    first = by_session[(1, t)]
    assert first.event_id == f"return:1:{t}"
    assert first.time_ms == t
    assert pd.isna(first.previous_session_id)
    assert first.previous_session_impressions == 0
    assert pd.isna(first.gap_ms)

    second = by_session[(1, t + 2 * HOUR)]
    assert second.previous_session_id == t
    assert second.previous_session_impressions == 3
    assert second.gap_ms == 2 * HOUR - 10 * MINUTE

    third = by_session[(1, t + 3 * HOUR)]
    assert third.previous_session_id == t + 2 * HOUR
    assert third.previous_session_impressions == 1
    assert third.gap_ms == HOUR

    prior_known = by_session[(2, t + MINUTE)]
    assert pd.isna(prior_known.previous_session_id)
    assert prior_known.gap_ms == HOUR + MINUTE
    assert by_session[(2, t + 3 * HOUR)].gap_ms == 3 * HOUR - MINUTE


def test_prior_activity_at_session_start_ignored():
    t = DAY_START
    with_sessions = assign_sessions(rows((1, t), (2, t)), SETTINGS)
    returns = derive_returns(with_sessions, SETTINGS, {1: t, 2: t - 1})
    gaps = dict(zip(returns["user_id"], returns["gap_ms"], strict=True))
    assert pd.isna(gaps[1])
    assert gaps[2] == 1


def test_returns_dtypes():
    t = DAY_START
    returns = derive_returns(assign_sessions(rows((1, t), (1, t + HOUR)), SETTINGS), SETTINGS, {})
    assert str(returns["previous_session_id"].dtype) == "Int64"
    assert str(returns["gap_ms"].dtype) == "Int64"
    assert returns["previous_session_impressions"].dtype == np.int64


def test_prior_activity_for():
    t = DAY_START
    full = rows((1, t), (2, t + HOUR), (1, t + 2 * HOUR), (3, t + 5 * HOUR))
    last_seen = {1: t + 30 * MINUTE, 2: t - HOUR, 4: t - 3 * HOUR, 5: t + 4 * HOUR}
    prior = prior_activity_for(full, t + 3 * HOUR, last_seen)
    assert prior == {1: t + 2 * HOUR, 2: t + HOUR, 4: t - 3 * HOUR}
    assert prior_activity_for(full, None, last_seen) == last_seen


@pytest.fixture(scope="module")
def shipped_sessions() -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = Settings().data_dir
    if folder is None:
        pytest.skip("the shipped KuaiRand folder is not next to the project")
    log = read_log(find_logs(Path(folder)))
    with_sessions = assign_sessions(log, SETTINGS)
    prior = prior_activity_for(log, None, read_last_seen(Path(folder)))
    return with_sessions, derive_returns(with_sessions, SETTINGS, prior)


def test_shipped_counts_consistent(shipped_sessions):
    log, returns = shipped_sessions
    sessions = log.groupby(["user_id", "session_id"]).size()
    assert len(returns) == len(sessions) == 141_511
    assert returns["previous_session_id"].isna().sum() == log["user_id"].nunique()
    last = log.groupby("user_id")["session_id"].transform("max")
    closed_rows = int((log["session_id"] < last).sum())
    assert returns["previous_session_impressions"].sum() == closed_rows
    assert returns["event_id"].is_unique


def test_shipped_sessions_respect_rule(shipped_sessions):
    log, returns = shipped_sessions
    starts = log[log["time_ms"] == log["session_id"]]
    assert len(starts.drop_duplicates(["user_id", "session_id"])) == len(returns)
    spans = log.groupby(["user_id", "session_id"])["time_ms"].agg(["min", "max"])
    days = calendar_day(spans["min"], 8) == calendar_day(spans["max"], 8)
    assert days.all()
    known = returns["gap_ms"].dropna()
    assert (known >= 0).all()
    assert (returns.loc[returns["previous_session_id"].notna(), "gap_ms"].notna()).all()
