"""Pandas reference state against values computed by hand on a tiny log."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from sec_online.clusters import VideoClusters
from sec_online.reference import reference_user_state
from sec_online.sessions import assign_sessions, derive_returns
from sec_online.settings import Settings

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
T = 1_650_931_200_000  # 2022-04-26 08:00 in UTC+8
SETTINGS = Settings(data_dir=None)
SIGNALS = ["is_click", "long_view", "is_like", "is_comment", "is_forward", "is_follow", "is_hate"]
# Video 99 has no features, so no cluster.
CLUSTERS = VideoClusters({10: 0, 11: 1, 12: 2}, clusters=3)


def row(user, time_ms, video, signals, play, duration):
    return {
        "user_id": user,
        "video_id": video,
        "time_ms": time_ms,
        **dict(zip(SIGNALS, signals, strict=True)),
        "play_time_ms": play,
        "duration_ms": duration,
    }


LOG = pd.DataFrame(
    [
        # User 1, session A at T: two rows of one request, one of an unknown video.
        row(1, T, 10, [1, 1, 0, 0, 0, 0, 0], 5_000, 10_000),
        row(1, T, 99, [0, 0, 0, 0, 0, 0, 0], 0, 0),
        # User 2, one session, last active two days before it.
        row(2, T + 5 * MINUTE, 11, [1, 0, 0, 0, 0, 0, 0], 1_000, 1_000),
        # User 3, two sessions 40 minutes apart; duration 0 gives watch 0.
        row(3, T, 12, [0, 0, 0, 0, 0, 0, 0], 500, 0),
        row(3, T + 40 * MINUTE, 12, [0, 0, 0, 0, 0, 0, 0], 500, 1_000),
        # User 1, session B: watch ratio 4 is capped at 3, and hate cancels the base weight.
        row(1, T + 2 * HOUR, 11, [1, 0, 0, 0, 0, 0, 1], 40_000, 10_000),
        # User 1, session C, open: one day after B.
        row(1, T + 2 * HOUR + DAY, 10, [1, 1, 1, 1, 0, 0, 0], 1_000, 2_000),
    ]
)


def states(settings: Settings = SETTINGS) -> dict[int, dict]:
    rows = assign_sessions(LOG, settings)
    prior = {2: T + 5 * MINUTE - 2 * DAY}
    returns = derive_returns(rows, settings, prior)
    return reference_user_state(rows, returns, CLUSTERS, settings)


def test_counts_and_open_session():
    user = states()[1]
    assert user["impressions"] == 4
    assert user["sessions"] == 3
    assert user["closed_sessions"] == 2
    assert user["returns"] == 3
    assert user["open_session_id"] == T + 2 * HOUR + DAY
    assert user["open_session_impressions"] == 1
    assert user["unknown_videos"] == 1
    assert user["signal_totals"] == [3, 2, 1, 1, 0, 0, 1]


def test_retention_score_moving_average():
    user = states()[1]
    # Session A has no known gap; B returns after 2 hours, C after one day.
    assert user["last_gap_ms"] == DAY
    rate_b, rate_c = 1 / (1 + 2 / 24), 1 / (1 + 1)
    assert user["retention_score"] == pytest.approx(0.7 * rate_b + 0.3 * rate_c, rel=1e-12)
    faster = dataclasses.replace(SETTINGS, score_decay=1.0)
    assert states(faster)[1]["retention_score"] == pytest.approx(rate_c, rel=1e-12)


def test_history_folds_closed_sessions():
    user = states()[1]
    # h = 0.8 * A + B over the closed sessions A and B; the open session C is left out.
    assert user["history_impressions"] == pytest.approx(0.8 * 2 + 1)
    assert user["history_signals"] == pytest.approx([1.8, 0.8, 0, 0, 0, 0, 1])
    assert user["history_watch"] == pytest.approx(0.8 * 0.5 + 3.0)
    assert user["history_sessions"] == pytest.approx(1.8)


def test_samples_need_positive_action_weight():
    # A: weight 2 on cluster 0 and none for the unknown video; B: max(0, 1 - 1) = 0.
    assert states()[1]["samples"] == 1
    # User 3's closed session has weight 1.
    assert states()[3]["samples"] == 1


def test_single_session_user_with_prior_gap():
    user = states()[2]
    assert user["sessions"] == 1
    assert user["closed_sessions"] == 0
    assert user["returns"] == 1
    assert user["last_gap_ms"] == 2 * DAY
    assert user["retention_score"] == pytest.approx(1 / 3)
    assert user["history_impressions"] == 0.0
    assert user["history_signals"] == [0.0] * 7
    assert user["history_sessions"] == 0.0
    assert user["samples"] == 0
    assert user["open_session_id"] == T + 5 * MINUTE


def test_zero_duration_and_unknown_first_gap():
    user = states()[3]
    assert user["sessions"] == 2
    assert user["last_gap_ms"] == 40 * MINUTE
    assert user["retention_score"] == pytest.approx(1 / (1 + 40 / 1440))
    assert user["history_watch"] == 0.0
    assert user["history_impressions"] == 1.0
    assert user["open_session_impressions"] == 1


def test_no_known_gap_gives_none():
    rows = assign_sessions(LOG[LOG["user_id"] == 1].iloc[:2], SETTINGS)
    returns = derive_returns(rows, SETTINGS, {})
    user = reference_user_state(rows, returns, CLUSTERS, SETTINGS)[1]
    assert user["last_gap_ms"] is None
    assert user["retention_score"] is None
    assert user["sessions"] == 1


def test_every_user_present():
    assert sorted(states()) == [1, 2, 3]
