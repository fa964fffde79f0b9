"""Evaluation dataset on a hand-written log: days, requests, gaps, censoring and start states."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sec_online.clusters import VideoClusters
from sec_online.data import LOG_DTYPES, event_ids
from sec_online.evaluation.dataset import (
    TEST,
    TRAIN,
    EvalDataset,
    action_columns,
    build_dataset,
    day_rate_columns,
)
from sec_online.sessions import assign_sessions
from sec_online.settings import Settings
from sec_online.userstate import feature_names, return_speed

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
DAY0 = 1_650_816_000_000  # 2022-04-25 00:00 in UTC+8
SETTINGS = Settings(data_dir=None, clusters=2, levels=2)
# Videos 10 and 11 are in cluster 0, 20 and 21 in cluster 1, and 99 has no features.
CLUSTERS = VideoClusters({10: 0, 11: 0, 20: 1, 21: 1}, clusters=2)


def video_features() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "video_id": [10, 11, 20, 21],
            "video_type": ["NORMAL", "NORMAL", "AD", "NORMAL"],
            "upload_type": ["A", "B", "A", "A"],
            "video_duration": [10_000.0, 20_000.0, np.nan, 40_000.0],
            "server_width": [720.0, 720.0, 1280.0, 720.0],
            "server_height": [1280.0, 1280.0, 720.0, 1280.0],
            "tag": ["1", "1,2", "3", pd.NA],
        }
    ).astype({"video_type": "string", "upload_type": "string", "tag": "string"})


def row(user: int, video: int, day: int, minute: int, **signals: int) -> dict[str, int]:
    values = {name: 0 for name in LOG_DTYPES if name.startswith("is_")}
    values["long_view"] = 0
    values.update(
        {key if key == "long_view" else f"is_{key}": value for key, value in signals.items()}
    )
    time_ms = DAY0 + day * DAY + 10 * HOUR + minute * MINUTE
    return {
        "user_id": user,
        "video_id": video,
        "time_ms": time_ms,
        "play_time_ms": 5_000,
        "duration_ms": 10_000 if video != 21 else 0,
        "tab": 1,
        "date": 20220425 + day,
        **values,
    }


def hand_log() -> pd.DataFrame:
    """Three users over days 0..5; the test days start at day 3.

    User 1: day 0 has two requests (a slate of videos 10 and 20, then video 11), day 1 one
    request, day 3 one request of a video without features. User 2: day 2 only. User 3: days 0
    and 5.
    """
    rows = [
        row(1, 10, 0, 0, click=1, long_view=1),
        row(1, 20, 0, 0),
        row(1, 11, 0, 5, hate=1),
        row(1, 21, 1, 0, like=1, click=1),
        row(1, 99, 3, 0, click=1),
        row(2, 10, 2, 30),
        row(3, 20, 0, 40, click=1),
        row(3, 11, 5, 0),
    ]
    log = pd.DataFrame(rows).astype({name: dtype for name, dtype in LOG_DTYPES.items()})
    log = log.sort_values("time_ms", kind="stable", ignore_index=True)
    log["event_id"] = event_ids(log)
    return assign_sessions(log, SETTINGS)


@pytest.fixture(scope="module")
def dataset() -> EvalDataset:
    return build_dataset(
        hand_log(), SETTINGS, CLUSTERS, split_day=3, video_features=video_features()
    )


def day_row(dataset: EvalDataset, user: int, day: int) -> pd.Series:
    days = dataset.days
    match = days.loc[(days["user_id"] == user) & (days["day"] == day)]
    assert len(match) == 1
    return match.iloc[0]


def test_dataset_sizes(dataset):
    assert dataset.n_features == len(feature_names(2)) == len(dataset.feature_names)
    assert dataset.n_clusters == 2
    assert len(dataset.impressions) == 8
    assert len(dataset.requests) == 7
    assert len(dataset.days) == 6
    assert dataset.last_day == 5
    assert dataset.split_day == 3
    assert dataset.day0_ms == DAY0


def test_video_table(dataset):
    assert dataset.video_ids.tolist() == [10, 11, 20, 21, 99]
    assert dataset.video_cluster.tolist() == [0, 0, 1, 1, -1]
    assert dataset.video_index == {10: 0, 11: 1, 20: 2, 21: 3, 99: 4}
    # Train days are 0..2. Video 11 is shown again on day 5 and video 99 only on day 3, both
    # test days, which do not count.
    assert dataset.video_popularity.tolist() == [2, 1, 2, 1, 0]
    assert dataset.video_matrix.dtype == np.float32
    assert np.allclose(dataset.video_matrix[:4].mean(axis=0), 0.0, atol=1e-6)
    assert not dataset.video_matrix[4].any()
    # Video 21 is logged with duration 0, so its duration comes from the features file.
    assert dataset.video_duration_ms.tolist() == [10_000.0, 10_000.0, 10_000.0, 40_000.0, 10_000.0]
    assert dataset.cluster_of(20) == 1
    assert dataset.cluster_of(99) is None
    assert dataset.cluster_of(12345) is None


def test_requests_group_a_slate(dataset):
    requests = dataset.requests
    first = requests.iloc[0]
    assert first["user_id"] == 1
    assert first["slate_size"] == 2
    assert first["slate"] == (0, 2)
    assert first["click"] == 1
    assert first["long_view"] == 1
    assert first["request_index"] == 0
    assert not first["is_last"]
    second = requests.loc[(requests["user_id"] == 1) & (requests["day"] == 0)].iloc[1]
    assert second["request_index"] == 1
    assert second["is_last"]
    assert second["hate"] == 1
    assert requests["time_ms"].is_monotonic_increasing
    assert requests["split"].tolist() == [TRAIN, TRAIN, TRAIN, TRAIN, TRAIN, TEST, TEST]


def test_request_states_exclude_own_feedback(dataset):
    requests = dataset.requests.set_index(["user_id", "day", "request_index"])
    names = dataset.feature_names
    first = requests.loc[(1, 0, 0), names].to_numpy(dtype=np.float64)
    assert not first.any()
    # The second request of day 0 is in the same session, which is still open.
    assert not requests.loc[(1, 0, 1), names].to_numpy(dtype=np.float64).any()


def test_request_states_after_a_closed_session(dataset):
    state = dataset.requests.set_index(["user_id", "day"]).loc[(1, 1)]
    assert state["rate_click"] == pytest.approx(1 / 3)
    assert state["rate_hate"] == pytest.approx(1 / 3)
    assert state["log_closed_sessions"] == pytest.approx(math.log1p(1))
    assert state["log_impressions_per_session"] == pytest.approx(math.log1p(3))
    gap_ms = DAY - 5 * MINUTE  # day 1 10:00 after day 0 10:05
    assert state["retention_score"] == pytest.approx(return_speed(gap_ms))
    assert state["has_retention_score"] == 1.0
    assert state["cluster_share_0"] == pytest.approx(2 / 3)


def test_prior_activity_gives_first_gap():
    prior = {1: DAY0 - 2 * DAY}
    dataset = build_dataset(
        hand_log(), SETTINGS, CLUSTERS, 3, video_features=video_features(), prior_activity=prior
    )
    first = dataset.requests.iloc[0]
    assert first["has_retention_score"] == 1.0
    assert first["retention_score"] == pytest.approx(return_speed(2 * DAY + 10 * HOUR))


def test_days_gaps_and_censoring(dataset):
    expected = {
        (1, 0): (1.0, None),
        (1, 1): (2.0, None),
        (1, 3): (None, 2.0),
        (2, 2): (None, 3.0),
        (3, 0): (5.0, None),
        (3, 5): (None, 0.0),
    }
    for (user, day), (gap, censored_at) in expected.items():
        record = day_row(dataset, user, day)
        if gap is None:
            assert math.isnan(record["gap_days"])
            assert record["censored"]
            assert record["censored_at"] == censored_at
        else:
            assert record["gap_days"] == gap
            assert not record["censored"]
            assert math.isnan(record["censored_at"])


def test_gap_capped_at_ten_days():
    log = hand_log()
    late = pd.DataFrame([row(3, 10, 12, 0)]).astype(dict(LOG_DTYPES))
    late["event_id"] = event_ids(late)
    log = assign_sessions(
        pd.concat([log.drop(columns="session_id"), late], ignore_index=True), SETTINGS
    )
    dataset = build_dataset(log, SETTINGS, CLUSTERS, 3, video_features=video_features())
    assert day_row(dataset, 3, 5)["gap_days"] == 7.0
    assert day_row(dataset, 3, 0)["gap_days"] == 5.0
    log = hand_log()
    later = pd.DataFrame([row(2, 10, 13, 0)]).astype(dict(LOG_DTYPES))
    later["event_id"] = event_ids(later)
    log = assign_sessions(
        pd.concat([log.drop(columns="session_id"), later], ignore_index=True), SETTINGS
    )
    dataset = build_dataset(log, SETTINGS, CLUSTERS, 3, video_features=video_features())
    assert day_row(dataset, 2, 2)["gap_days"] == 10.0  # 11 days, capped


def test_day_aggregates_and_actions(dataset):
    record = day_row(dataset, 1, 0)
    assert record["requests"] == 2
    assert record["impressions"] == 3
    assert record["start_ms"] == DAY0 + 10 * HOUR
    assert record["split"] == TRAIN
    rates = dict(zip(day_rate_columns(), record[day_rate_columns()], strict=True))
    assert rates["day_rate_click"] == pytest.approx(1 / 3)
    assert rates["day_rate_hate"] == pytest.approx(1 / 3)
    assert record["day_watch_ratio"] == pytest.approx(0.5)
    # Video 10 weighs 2 (shown + long view), 20 weighs 1, 11 weighs 0 (shown - hate).
    actions = record[action_columns(2)].to_numpy(dtype=np.float64)
    assert actions.tolist() == pytest.approx([2 / 3, 1 / 3])
    unknown = day_row(dataset, 1, 3)
    assert unknown["split"] == TEST
    assert not unknown[action_columns(2)].to_numpy(dtype=np.float64).any()
    assert dataset.actions(dataset.days).shape == (6, 2)
    assert dataset.states(dataset.days).shape == (6, dataset.n_features)


def test_day_state_is_first_request_state(dataset):
    names = dataset.feature_names
    first_requests = dataset.requests.loc[dataset.requests["request_index"] == 0]
    by_day = first_requests.set_index("day_id")[names].sort_index()
    assert np.array_equal(by_day.to_numpy(), dataset.days[names].to_numpy())


def test_user_static_after_train_days(dataset):
    assert sorted(dataset.user_static) == [1, 3]
    assert dataset.test_users().tolist() == [1, 3]
    user = dataset.user_static[1]
    assert user["impressions"] == 4
    assert user["closed_sessions"] == 1
    assert list(user["open"]) == [str(DAY0 + DAY + 10 * HOUR)]
    assert dataset.user_static[3]["impressions"] == 1
    assert dataset.user_static[3]["retention_score"] is None


def test_level_boundaries_from_train_scores(dataset):
    # After the train days only user 1 has a retention score: its return on day 1.
    assert dataset.level_boundaries == pytest.approx([return_speed(DAY - 5 * MINUTE)])
    assert dataset.levels == 2


def test_row_order_does_not_matter(dataset):
    shuffled = hand_log().sample(frac=1.0, random_state=7)
    again = build_dataset(shuffled, SETTINGS, CLUSTERS, 3, video_features=video_features())
    pd.testing.assert_frame_equal(again.requests, dataset.requests)
    pd.testing.assert_frame_equal(again.days, dataset.days)
    pd.testing.assert_frame_equal(again.impressions, dataset.impressions)
    assert again.user_static == dataset.user_static


@pytest.mark.parametrize("split_day", [0, 6])
def test_split_day_out_of_range(split_day):
    with pytest.raises(ValueError, match="split_day must be between 1 and the last day index 5"):
        build_dataset(hand_log(), SETTINGS, CLUSTERS, split_day, video_features=video_features())


def test_invalid_inputs():
    with pytest.raises(ValueError, match="lacks the columns session_id"):
        build_dataset(
            hand_log().drop(columns="session_id"),
            SETTINGS,
            CLUSTERS,
            3,
            video_features=video_features(),
        )
    with pytest.raises(ValueError, match="has no rows"):
        build_dataset(hand_log().iloc[:0], SETTINGS, CLUSTERS, 3, video_features=video_features())
    with pytest.raises(ValueError, match="SEC_CLUSTERS=32"):
        build_dataset(
            hand_log(), Settings(data_dir=None), CLUSTERS, 3, video_features=video_features()
        )
    split = hand_log()
    split.loc[1, "session_id"] = split.loc[1, "session_id"] - 1
    with pytest.raises(ValueError, match="user 1 at time_ms .* more than one session"):
        build_dataset(split, SETTINGS, CLUSTERS, 3, video_features=video_features())
