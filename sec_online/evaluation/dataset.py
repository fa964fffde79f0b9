"""The logged interactions as an offline evaluation dataset: videos, requests and user-days.

The unit of the offline evaluation is the user-day: all requests of one user on one calendar day
(UTC + ``Settings.day_offset_hours``, see ``sec_online.sessions.calendar_day``). A request is the
set of log rows of one user with the same ``time_ms``, the slate shown at once. Day 0 is the first
calendar day of the log. Days before ``split_day`` are train days, the others are test days.

State features come from the live system's ``UserStateMachine``, replayed over the log in time
order with the events the Kafka replay would publish (``sec_online.replay.iter_events``): a
session's return just before its first impression. A request's features are taken after the
returns before it and before its own impressions, so they never contain the request's feedback.

The return gap of a user-day is the number of days until the user's next active day, capped at
``GAP_CAP_DAYS`` ("that many or more"). A user's last day in the log has no observed gap, so it is
censored at ``last_day - day``: the gap is known to exceed that many days.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sec_online.clusters import VideoClusters, feature_matrix
from sec_online.data import SIGNAL_COLUMNS, read_video_features
from sec_online.levels import even_boundaries
from sec_online.replay import iter_events
from sec_online.schemas import FEEDBACK_SIGNALS, Impression
from sec_online.sessions import MS_PER_DAY, MS_PER_HOUR, calendar_day, derive_returns
from sec_online.settings import Settings
from sec_online.userstate import WATCH_RATIO_CAP, UserStateMachine, feature_names

logger = logging.getLogger(__name__)

GAP_CAP_DAYS = 10
TRAIN = "train"
TEST = "test"
# Log columns that build_dataset reads, besides the seven signal columns.
REQUIRED_COLUMNS = (
    "user_id",
    "video_id",
    "time_ms",
    "session_id",
    "event_id",
    "play_time_ms",
    "duration_ms",
    "tab",
    *SIGNAL_COLUMNS,
)
# Signals that add to a shown video's action weight, and the one that subtracts (as in
# sec_online.userstate.action_weight).
POSITIVE_ACTION_SIGNALS = ("long_view", "like", "comment", "forward", "follow")
MIN_STD = 1e-12


@dataclass(frozen=True)
class EvalDataset:
    """Videos, requests, impressions and user-days of a log, split into train and test days.

    ``F`` is the state feature count, ``A`` the cluster count, ``V`` the video count, ``R`` the
    request count, ``N`` the impression count and ``D`` the user-day count.

    Attributes
    ----------
    n_features, n_clusters, feature_names
        ``F``, ``A`` and the ``F`` state feature names (``sec_online.userstate.feature_names``).
    video_ids
        ``[V]`` int64, ascending: every video of the log or of the video features.
    video_cluster
        ``[V]`` int64, the video's cluster, -1 for a video without features.
    video_matrix
        ``[V, Dv]`` float32: the clustering features (``sec_online.clusters.feature_matrix``),
        each column standardised to mean 0 and standard deviation 1 over the videos that have
        features. Rows of videos without features are 0, the mean video.
    video_popularity
        ``[V]`` int64, impressions of the video on train days.
    video_duration_ms
        ``[V]`` float64, the video's median positive logged duration. A video without one takes
        its duration from the video features, or else the median over the other videos.
    video_index
        Video id to row of the video arrays.
    requests
        One row per request, in time order, indexed by request id ``0..R-1``. Columns:
        ``user_id``, ``day``, ``time_ms``, ``session_id``, ``day_id`` (row of ``days``),
        ``request_index`` (0-based within the user-day), ``is_last`` (last request of its
        user-day), ``slate_size``, ``split``, the ``F`` state features at the request's start,
        the seven signals summed over the slate (``FEEDBACK_SIGNALS`` names), ``watch_sum``
        (summed capped watch ratios) and ``slate`` (tuple of video rows).
    impressions
        One row per log row, in time order: ``request_id``, ``user_id``, ``day``,
        ``video_row``, the seven signals (0/1) and ``watch_ratio`` (play time over duration,
        capped at ``WATCH_RATIO_CAP``).
    days
        One row per user-day, sorted by user then day, indexed by day id ``0..D-1``. Columns:
        ``user_id``, ``day``, ``start_ms`` (time of the first request), ``split``, the ``F``
        state features at the first request, ``requests``, ``impressions``,
        ``day_rate_<signal>`` (share of the day's impressions with that signal),
        ``day_watch_ratio`` (mean capped watch ratio), ``gap_days`` (float, NaN when censored),
        ``censored`` (bool), ``censored_at`` (float days, NaN when not censored) and
        ``action_0 .. action_<A-1>``: the day's action distribution over clusters, action
        weights (``sec_online.userstate.action_weight``) of known-cluster videos normalised to
        sum 1, all 0 when the day has no such weight.
    user_static
        State dict (``UserStateMachine``) of every user active on test days, after all train
        days: the start state of a simulation. A user without train activity has a new state.
    level_boundaries
        ``K - 1`` ascending boundaries: the quantiles ``1/K .. (K-1)/K`` of the retention scores
        of users with a score after the train days; the even split when no user has one.
    levels, split_day, last_day
        ``K``, the first test day and the last day index of the log.
    day0_ms
        Unix ms of the start (local midnight) of day 0.
    """

    n_features: int
    n_clusters: int
    feature_names: list[str]
    video_ids: np.ndarray
    video_cluster: np.ndarray
    video_matrix: np.ndarray
    video_popularity: np.ndarray
    video_duration_ms: np.ndarray
    video_index: dict[int, int]
    requests: pd.DataFrame
    impressions: pd.DataFrame
    days: pd.DataFrame
    user_static: dict[int, dict[str, Any]]
    level_boundaries: list[float]
    levels: int
    split_day: int
    last_day: int
    day0_ms: int

    @property
    def n_videos(self) -> int:
        """Number ``V`` of videos."""
        return len(self.video_ids)

    def cluster_of(self, video_id: int) -> int | None:
        """Cluster of a video id, ``None`` for a video without features or not in the dataset."""
        row = self.video_index.get(int(video_id))
        if row is None or self.video_cluster[row] < 0:
            return None
        return int(self.video_cluster[row])

    def states(self, frame: pd.DataFrame) -> np.ndarray:
        """State features of ``requests`` or ``days`` rows, ``[len(frame), F]`` float32."""
        return frame[self.feature_names].to_numpy(dtype=np.float32, copy=True)

    def actions(self, frame: pd.DataFrame) -> np.ndarray:
        """Action distributions of ``days`` rows, ``[len(frame), A]`` float32."""
        return frame[action_columns(self.n_clusters)].to_numpy(dtype=np.float32, copy=True)

    def test_users(self) -> np.ndarray:
        """Ids of the users active on at least one test day, ascending int64."""
        test = self.days.loc[self.days["split"] == TEST, "user_id"]
        return np.sort(test.unique()).astype(np.int64)


def action_columns(clusters: int) -> list[str]:
    """Names of the action distribution columns of ``EvalDataset.days``."""
    return [f"action_{cluster}" for cluster in range(clusters)]


def day_rate_columns() -> list[str]:
    """Names of the per-signal rate columns of ``EvalDataset.days``."""
    return [f"day_rate_{name}" for name in FEEDBACK_SIGNALS]


def build_dataset(
    log: pd.DataFrame,
    settings: Settings,
    clusters: VideoClusters,
    split_day: int,
    *,
    video_features: pd.DataFrame | None = None,
    prior_activity: Mapping[int, int] | None = None,
) -> EvalDataset:
    """Build the evaluation dataset of a log.

    Parameters
    ----------
    log
        Log rows with the columns of ``sec_online.data.read_log`` and ``session_id``
        (``sec_online.sessions.assign_sessions``), in any row order.
    settings
        ``clusters``, ``levels``, ``score_decay`` and ``day_offset_hours`` are used.
    clusters
        Cluster of each video, with ``settings.clusters`` clusters.
    split_day
        First test day, between 1 and the last day index, so both splits have days.
    video_features
        Frame of ``sec_online.data.read_video_features``; read from ``settings.data_dir`` when
        ``None``.
    prior_activity
        Each user's last request time (Unix ms) before the log, which gives the gap of the
        first return (``sec_online.sessions.prior_activity_for``). ``None`` leaves those gaps
        unknown.

    Raises
    ------
    ValueError
        When the log lacks columns or is empty, a request has rows in two sessions, the cluster
        count differs from ``settings.clusters``, or ``split_day`` leaves a split empty.
    """
    started = time.monotonic()
    _check_inputs(log, settings, clusters)
    rows = _prepare_rows(log, settings)
    first_day = int(calendar_day(rows["time_ms"].iloc[0], settings.day_offset_hours))
    day0_ms = first_day * MS_PER_DAY - settings.day_offset_hours * MS_PER_HOUR
    last_day = int(rows["day"].iloc[-1])
    if not 1 <= split_day <= last_day:
        raise ValueError(
            f"split_day must be between 1 and the last day index {last_day} so that train and "
            f"test days both exist, got {split_day}"
        )
    if video_features is None:
        video_features = read_video_features(settings.require_data_dir())
    videos = _video_table(rows, video_features, clusters, split_day)
    rows["video_row"] = pd.Index(videos["video_ids"]).get_indexer(rows["video_id"])
    machine = UserStateMachine(clusters.clusters, clusters.cluster_of, settings.score_decay)
    replayed = _replay(
        rows, settings, machine, day0_ms + split_day * MS_PER_DAY, prior_activity or {}
    )
    requests = _request_table(rows, replayed.request_states, machine, split_day)
    days = _day_table(rows, requests, machine, clusters.clusters, last_day)
    requests["day_id"] = _day_ids(requests, days)
    dataset = EvalDataset(
        n_features=machine.n_features,
        n_clusters=clusters.clusters,
        feature_names=feature_names(clusters.clusters),
        video_index={int(video): row for row, video in enumerate(videos["video_ids"])},
        requests=requests,
        impressions=_impression_table(rows),
        days=days,
        user_static=replayed.user_static,
        level_boundaries=_quantile_boundaries(replayed.train_scores, settings.levels),
        levels=settings.levels,
        split_day=split_day,
        last_day=last_day,
        day0_ms=day0_ms,
        **videos,
    )
    logger.info(
        "built evaluation dataset: impressions=%d requests=%d user_days=%d users=%d videos=%d "
        "split_day=%d last_day=%d seconds=%.1f",
        len(rows),
        len(requests),
        len(days),
        days["user_id"].nunique(),
        dataset.n_videos,
        split_day,
        last_day,
        time.monotonic() - started,
    )
    return dataset


def _check_inputs(log: pd.DataFrame, settings: Settings, clusters: VideoClusters) -> None:
    missing = [name for name in REQUIRED_COLUMNS if name not in log.columns]
    if missing:
        raise ValueError(
            f"the log lacks the columns {', '.join(missing)}; pass rows of "
            "sec_online.data.read_log with session_id from sec_online.sessions.assign_sessions"
        )
    if log.empty:
        raise ValueError("the log has no rows, so there is no day to build a dataset from")
    if clusters.clusters != settings.clusters:
        raise ValueError(
            f"the video clusters have {clusters.clusters} clusters but SEC_CLUSTERS="
            f"{settings.clusters}; build the clusters with the same settings"
        )


def _prepare_rows(log: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Sort the rows by time and add ``day``, ``request_id`` and ``first_of_request``."""
    rows = log.sort_values("time_ms", kind="stable", ignore_index=True)
    local_day = calendar_day(rows["time_ms"].to_numpy(), settings.day_offset_hours)
    rows["day"] = local_day - local_day.min()
    grouped = rows.groupby(["user_id", "time_ms"], sort=False)
    rows["request_id"] = grouped.ngroup().to_numpy(dtype=np.int64)
    rows["first_of_request"] = ~rows.duplicated(["user_id", "time_ms"]).to_numpy()
    sessions_per_request = grouped["session_id"].nunique()
    if (sessions_per_request > 1).any():
        user_id, time_ms = sessions_per_request[sessions_per_request > 1].index[0]
        raise ValueError(
            f"the rows of user {user_id} at time_ms {time_ms} belong to more than one session; "
            "all rows of a request must share session_id (sec_online.sessions.assign_sessions)"
        )
    signals = rows[list(SIGNAL_COLUMNS)].to_numpy(dtype=np.int64)
    rows[list(FEEDBACK_SIGNALS)] = signals
    rows["watch_ratio"] = _watch_ratios(rows)
    return rows


def _watch_ratios(rows: pd.DataFrame) -> np.ndarray:
    play = rows["play_time_ms"].to_numpy(dtype=np.float64)
    duration = rows["duration_ms"].to_numpy(dtype=np.float64)
    ratio = np.divide(play, duration, out=np.zeros_like(play), where=duration > 0)
    return np.minimum(ratio, WATCH_RATIO_CAP)


def _video_table(
    rows: pd.DataFrame, features: pd.DataFrame, clusters: VideoClusters, split_day: int
) -> dict[str, Any]:
    """Video arrays, ``[V]`` or ``[V, Dv]``, over the union of logged and featured videos."""
    features = features.sort_values("video_id", ignore_index=True)
    featured = features["video_id"].to_numpy(dtype=np.int64)
    video_ids = np.union1d(featured, rows["video_id"].to_numpy(dtype=np.int64))
    matrix, _ = feature_matrix(features)
    std = matrix.std(axis=0)
    matrix = (matrix - matrix.mean(axis=0)) / np.where(std > MIN_STD, std, 1.0)
    video_matrix = np.zeros((len(video_ids), matrix.shape[1]), dtype=np.float32)
    video_matrix[np.searchsorted(video_ids, featured)] = matrix
    logged_rows = np.searchsorted(video_ids, rows["video_id"].to_numpy(dtype=np.int64))
    train = rows["day"].to_numpy() < split_day
    return {
        "video_ids": video_ids,
        "video_cluster": clusters.clusters_of(video_ids.tolist()),
        "video_matrix": video_matrix,
        "video_popularity": np.bincount(logged_rows[train], minlength=len(video_ids)),
        "video_duration_ms": _video_durations(rows, features, video_ids),
    }


def _video_durations(
    rows: pd.DataFrame, features: pd.DataFrame, video_ids: np.ndarray
) -> np.ndarray:
    positive = rows.loc[rows["duration_ms"] > 0]
    logged = positive.groupby("video_id")["duration_ms"].median()
    featured = features.set_index("video_id")["video_duration"]
    featured = featured[featured > 0]
    durations = logged.reindex(video_ids).fillna(featured.reindex(video_ids))
    known = durations.dropna()
    fallback = float(known.median()) if len(known) else 1_000.0
    return durations.fillna(fallback).to_numpy(dtype=np.float64)


@dataclass
class _Replayed:
    request_states: np.ndarray
    user_static: dict[int, dict[str, Any]]
    train_scores: list[float]


def _replay(
    rows: pd.DataFrame,
    settings: Settings,
    machine: UserStateMachine,
    split_ms: int,
    prior_activity: Mapping[int, int],
) -> _Replayed:
    """Replay the rows' events through the state machine and record request-start states.

    ``rows`` must be in time order. The states of test users are copied right before the first
    event at or after ``split_ms`` (Unix ms), the start of the first test day.
    """
    returns = derive_returns(rows, settings, prior_activity)
    test_users = rows.loc[rows["time_ms"] >= split_ms, "user_id"].unique().tolist()
    boundaries = even_boundaries(settings.levels)
    first_of_request = rows["first_of_request"].tolist()
    request_ids = rows["request_id"].tolist()
    request_states = np.zeros((int(rows["request_id"].max()) + 1, machine.n_features), np.float32)
    states: dict[int, dict[str, Any]] = {}
    snapshot: dict[int, dict[str, Any]] | None = None
    train_scores: list[float] = []
    row = 0
    for event in iter_events(rows, returns):
        if snapshot is None and event.time_ms >= split_ms:
            snapshot = _snapshot(states, test_users, machine)
            train_scores = _retention_scores(states)
        if not isinstance(event, Impression):
            states[event.user_id] = machine.apply_return(
                states.get(event.user_id), event, boundaries, 0
            ).state
            continue
        if first_of_request[row]:
            state = states.get(event.user_id) or machine.new_state(event.user_id)
            request_states[request_ids[row]] = machine.features(state)
        states[event.user_id] = machine.apply_impression(states.get(event.user_id), event).state
        row += 1
    if snapshot is None:
        raise AssertionError("split_day was checked to lie within the log, so test rows exist")
    return _Replayed(request_states, snapshot, train_scores)


def _snapshot(
    states: dict[int, dict[str, Any]], test_users: list[int], machine: UserStateMachine
) -> dict[int, dict[str, Any]]:
    """Copy the states of the test users; users not seen yet get a new state."""
    # A JSON round trip is a deep copy (states are JSON values) and much faster than deepcopy.
    return {
        user: json.loads(json.dumps(states[user])) if user in states else machine.new_state(user)
        for user in test_users
    }


def _retention_scores(states: dict[int, dict[str, Any]]) -> list[float]:
    return [
        state["retention_score"]
        for state in states.values()
        if state["retention_score"] is not None
    ]


def _quantile_boundaries(scores: list[float], levels: int) -> list[float]:
    if not scores or levels == 1:
        return even_boundaries(levels)
    quantiles = [j / levels for j in range(1, levels)]
    return [float(value) for value in np.quantile(np.asarray(scores), quantiles)]


def _request_table(
    rows: pd.DataFrame, states: np.ndarray, machine: UserStateMachine, split_day: int
) -> pd.DataFrame:
    grouped = rows.groupby("request_id", sort=True)
    first = grouped.first()
    requests = pd.DataFrame(
        {
            "user_id": first["user_id"].to_numpy(dtype=np.int64),
            "day": first["day"].to_numpy(dtype=np.int64),
            "time_ms": first["time_ms"].to_numpy(dtype=np.int64),
            "session_id": first["session_id"].to_numpy(dtype=np.int64),
        }
    )
    requests["request_index"] = requests.groupby(["user_id", "day"]).cumcount()
    requests["is_last"] = ~requests.duplicated(["user_id", "day"], keep="last")
    requests["slate_size"] = grouped.size().to_numpy(dtype=np.int64)
    requests["split"] = np.where(requests["day"] < split_day, TRAIN, TEST)
    names = feature_names(machine.clusters)
    requests = pd.concat([requests, pd.DataFrame(states, columns=names)], axis=1)
    sums = grouped[[*FEEDBACK_SIGNALS, "watch_ratio"]].sum()
    for name in FEEDBACK_SIGNALS:
        requests[name] = sums[name].to_numpy(dtype=np.int64)
    requests["watch_sum"] = sums["watch_ratio"].to_numpy(dtype=np.float64)
    requests["slate"] = _slates(rows)
    return requests


def _slates(rows: pd.DataFrame) -> np.ndarray:
    """Video rows of each request as a tuple, in row order, ``[R]`` object array."""
    order = np.argsort(rows["request_id"].to_numpy(), kind="stable")
    video_rows = rows["video_row"].to_numpy(dtype=np.int64)[order]
    request_ids = rows["request_id"].to_numpy()[order]
    bounds = np.flatnonzero(np.diff(request_ids)) + 1
    slates = np.empty(int(request_ids[-1]) + 1, dtype=object)
    slates[:] = [tuple(part.tolist()) for part in np.split(video_rows, bounds)]
    return slates


def _impression_table(rows: pd.DataFrame) -> pd.DataFrame:
    columns = ["request_id", "user_id", "day", "video_row", *FEEDBACK_SIGNALS, "watch_ratio"]
    impressions = rows[columns].copy()
    impressions["user_id"] = impressions["user_id"].astype(np.int64)
    impressions["day"] = impressions["day"].astype(np.int64)
    return impressions


def _day_table(
    rows: pd.DataFrame,
    requests: pd.DataFrame,
    machine: UserStateMachine,
    clusters: int,
    last_day: int,
) -> pd.DataFrame:
    keys = ["user_id", "day"]
    first = requests.groupby(keys, sort=True).first().reset_index()
    names = feature_names(machine.clusters)
    days = first[[*keys, "split"]].copy()
    days.insert(2, "start_ms", first["time_ms"].to_numpy(dtype=np.int64))
    days[names] = first[names].to_numpy(dtype=np.float32)
    days["requests"] = requests.groupby(keys, sort=True).size().to_numpy(dtype=np.int64)
    by_day = rows.groupby(keys, sort=True)
    days["impressions"] = by_day.size().to_numpy(dtype=np.int64)
    means = by_day[[*FEEDBACK_SIGNALS, "watch_ratio"]].mean()
    for name, column in zip(FEEDBACK_SIGNALS, day_rate_columns(), strict=True):
        days[column] = means[name].to_numpy(dtype=np.float64)
    days["day_watch_ratio"] = means["watch_ratio"].to_numpy(dtype=np.float64)
    _add_gaps(days, last_day)
    actions = _day_actions(rows, days, machine, clusters)
    days[action_columns(clusters)] = actions
    return days


def _add_gaps(days: pd.DataFrame, last_day: int) -> None:
    """Add ``gap_days``, ``censored`` and ``censored_at``; ``days`` is sorted by user, day."""
    next_day = days.groupby("user_id")["day"].shift(-1)
    censored = next_day.isna().to_numpy()
    gap = (next_day - days["day"]).clip(upper=GAP_CAP_DAYS)
    days["gap_days"] = gap.astype(np.float64)
    days["censored"] = censored
    days["censored_at"] = np.where(censored, last_day - days["day"], np.nan).astype(np.float64)


def _day_actions(
    rows: pd.DataFrame, days: pd.DataFrame, machine: UserStateMachine, clusters: int
) -> np.ndarray:
    """Action distribution of each day over clusters, ``[D, A]`` float32."""
    cluster = np.fromiter(
        (_cluster_or_minus_one(machine, video) for video in rows["video_id"].tolist()),
        dtype=np.int64,
        count=len(rows),
    )
    signals = rows[list(POSITIVE_ACTION_SIGNALS)].to_numpy(dtype=np.int64).sum(axis=1)
    weight = np.maximum(0, 1 + signals - rows["hate"].to_numpy(dtype=np.int64))
    day_ids = pd.MultiIndex.from_frame(days[["user_id", "day"]]).get_indexer(
        pd.MultiIndex.from_frame(rows[["user_id", "day"]])
    )
    known = cluster >= 0
    totals = np.zeros((len(days), clusters), dtype=np.float64)
    np.add.at(totals, (day_ids[known], cluster[known]), weight[known])
    sums = totals.sum(axis=1, keepdims=True)
    shares = np.divide(totals, sums, out=np.zeros_like(totals), where=sums > 0)
    return shares.astype(np.float32)


def _cluster_or_minus_one(machine: UserStateMachine, video_id: int) -> int:
    cluster = machine.cluster_of(video_id)
    return -1 if cluster is None else cluster


def _day_ids(requests: pd.DataFrame, days: pd.DataFrame) -> np.ndarray:
    index = pd.MultiIndex.from_frame(days[["user_id", "day"]])
    return index.get_indexer(pd.MultiIndex.from_frame(requests[["user_id", "day"]]))
