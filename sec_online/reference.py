"""Per-user state computed with pandas from whole log rows, as ground truth for the worker.

The worker updates each user's state one event at a time. This module computes, from the rows as
a table, the state that the worker must reach after all events of those rows. It shares no code
with the worker's state module, so comparing the two checks each against the other.

Every session of a user but the last is closed, by the return that opens the next session. The
last session stays open. The history folds the closed sessions in session order, each fold
multiplying the older history by ``HISTORY_DECAY``.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import pandas as pd

from sec_online.data import SIGNAL_COLUMNS
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

HISTORY_DECAY = 0.8
# A row's watch ratio is play time over duration, capped, and 0 when the duration is not positive.
WATCH_CAP = 3.0
MS_PER_DAY = 86_400_000
# Signals that add to a row's action weight, and the one that subtracts.
POSITIVE_ACTION_COLUMNS = ("long_view", "is_like", "is_comment", "is_forward", "is_follow")
NEGATIVE_ACTION_COLUMN = "is_hate"


class ClusterLookup(Protocol):
    """Anything that maps a video id to its cluster, like ``VideoClusters``."""

    def cluster_of(self, video_id: int) -> int | None: ...


def reference_user_state(
    log_rows_with_sessions: pd.DataFrame,
    returns_df: pd.DataFrame,
    clusters: ClusterLookup,
    settings: Settings,
) -> dict[int, dict[str, Any]]:
    """Compute each user's expected state after all given rows and returns.

    Parameters
    ----------
    log_rows_with_sessions
        Log rows with ``session_id`` (``sec_online.sessions.assign_sessions``).
    returns_df
        Returns of these rows (``sec_online.sessions.derive_returns``).
    clusters
        Cluster of each video; rows of a video without one carry no action.
    settings
        ``score_decay`` is the weight of the newest return in the retention score.

    Returns
    -------
    dict
        By user id, a dict with:

        - ``impressions``, ``sessions``, ``closed_sessions`` (sessions - 1), ``returns``;
        - ``last_gap_ms``: gap of the user's last return with a known gap, or ``None``;
        - ``retention_score``: moving average of ``1 / (1 + gap_ms / 1 day)`` over returns with
          a known gap, in time order, or ``None`` when there is none;
        - ``signal_totals``: the seven signal sums over all rows, as ints;
        - ``history_impressions``, ``history_signals`` (7 floats), ``history_watch``,
          ``history_sessions``: decayed sums over closed sessions;
        - ``open_session_id``, ``open_session_impressions``: the last session;
        - ``unknown_videos``: rows whose video has no cluster;
        - ``samples``: closed sessions whose action weights sum to more than 0.
    """
    rows = _with_row_values(log_rows_with_sessions, clusters)
    sessions = _session_table(rows)
    users = _user_table(rows, sessions, returns_df)
    history = _history(sessions)
    scores = _retention(returns_df, settings.score_decay)
    no_score = {"last_gap_ms": None, "retention_score": None}
    states: dict[int, dict[str, Any]] = {}
    for record in users.to_dict("records"):
        user_id = int(record["user_id"])
        states[user_id] = {
            "impressions": int(record["impressions"]),
            "sessions": int(record["sessions"]),
            "closed_sessions": int(record["sessions"]) - 1,
            "returns": int(record["returns"]),
            **scores.get(user_id, no_score),
            "signal_totals": [int(record[name]) for name in SIGNAL_COLUMNS],
            **history.get(user_id, _empty_history()),
            "open_session_id": int(record["open_session_id"]),
            "open_session_impressions": int(record["open_session_impressions"]),
            "unknown_videos": int(record["unknown_video"]),
            "samples": int(record["samples"]),
        }
    return states


def _with_row_values(log: pd.DataFrame, clusters: ClusterLookup) -> pd.DataFrame:
    """Add each row's watch ratio, whether its video is unknown, and its action weight."""
    rows = log.copy()
    video_clusters = {video: clusters.cluster_of(int(video)) for video in rows["video_id"].unique()}
    known = rows["video_id"].map(lambda video: video_clusters[video] is not None).astype(bool)
    play = rows["play_time_ms"].to_numpy(dtype=np.float64)
    duration = rows["duration_ms"].to_numpy(dtype=np.float64)
    positive = duration > 0
    ratio = np.divide(play, duration, out=np.zeros_like(play), where=positive)
    rows["watch"] = np.minimum(ratio, WATCH_CAP)
    rows["unknown_video"] = (~known).astype(np.int64)
    raw_weight = (
        1
        + rows[list(POSITIVE_ACTION_COLUMNS)].astype(np.int64).sum(axis=1)
        - rows[NEGATIVE_ACTION_COLUMN].astype(np.int64)
    )
    rows["action_weight"] = raw_weight.clip(lower=0).where(known, 0)
    return rows


def _session_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Sum each session's rows into one row per (user, session), in session order."""
    sums = {name: (name, "sum") for name in (*SIGNAL_COLUMNS, "watch", "action_weight")}
    table = rows.groupby(["user_id", "session_id"], sort=True).agg(
        impressions=("session_id", "size"), **sums
    )
    return table.reset_index()


def _user_table(rows: pd.DataFrame, sessions: pd.DataFrame, returns: pd.DataFrame) -> pd.DataFrame:
    """Build one row per user with counts, signal totals and the open (last) session."""
    table = rows.groupby("user_id")[[*SIGNAL_COLUMNS, "unknown_video"]].sum()
    table["impressions"] = rows.groupby("user_id").size()
    by_user = sessions.groupby("user_id")
    table["sessions"] = by_user.size()
    table["open_session_id"] = by_user["session_id"].last()
    table["open_session_impressions"] = by_user["impressions"].last()
    closed = sessions.groupby("user_id").cumcount(ascending=False) > 0
    has_action = closed & (sessions["action_weight"] > 0)
    table["samples"] = has_action.groupby(sessions["user_id"]).sum()
    table["returns"] = returns.groupby("user_id").size().reindex(table.index, fill_value=0)
    return table.reset_index()


def _history(sessions: pd.DataFrame) -> dict[int, dict[str, Any]]:
    """Decayed sums over each user's closed sessions.

    Folding ``h = d * h + v`` over values ``v_0 .. v_(n-1)`` from ``h = 0`` gives
    ``sum_j d ** (n - 1 - j) * v_j``, so each closed session is weighted by ``d`` to the power of
    the number of closed sessions after it.
    """
    newer = sessions.groupby("user_id").cumcount(ascending=False)  # 0 for the open session
    closed = sessions.loc[newer > 0].copy()
    weight = HISTORY_DECAY ** (newer[newer > 0] - 1).to_numpy(dtype=np.float64)
    columns = ["impressions", *SIGNAL_COLUMNS, "watch"]
    weighted = closed[columns].astype(np.float64).mul(weight, axis=0)
    weighted["history_sessions"] = weight
    weighted["user_id"] = closed["user_id"].to_numpy()
    sums = weighted.groupby("user_id").sum()
    history: dict[int, dict[str, Any]] = {}
    for user_id, row in sums.iterrows():
        history[int(user_id)] = {
            "history_impressions": float(row["impressions"]),
            "history_signals": [float(row[name]) for name in SIGNAL_COLUMNS],
            "history_watch": float(row["watch"]),
            "history_sessions": float(row["history_sessions"]),
        }
    return history


def _retention(returns: pd.DataFrame, score_decay: float) -> dict[int, dict[str, Any]]:
    """Last known gap and retention score of each user with at least one known gap."""
    known = returns.loc[returns["gap_ms"].notna()].sort_values(
        ["user_id", "time_ms"], kind="stable"
    )
    scores: dict[int, dict[str, Any]] = {}
    users = known["user_id"].tolist()
    gaps = [int(gap) for gap in known["gap_ms"].tolist()]
    for user_id, gap in zip(users, gaps, strict=True):
        rate = 1.0 / (1.0 + gap / MS_PER_DAY)
        state = scores.get(user_id)
        if state is None:
            scores[user_id] = {"last_gap_ms": gap, "retention_score": rate}
        else:
            score = (1 - score_decay) * state["retention_score"] + score_decay * rate
            scores[user_id] = {"last_gap_ms": gap, "retention_score": score}
    return scores


def _empty_history() -> dict[str, Any]:
    return {
        "history_impressions": 0.0,
        "history_signals": [0.0] * len(SIGNAL_COLUMNS),
        "history_watch": 0.0,
        "history_sessions": 0.0,
    }
