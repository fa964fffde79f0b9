"""Sessions and returns derived from the interaction log.

A session is a run of one user's requests. A request starts a new session when it is the user's
first request, when more than ``Settings.session_idle_minutes`` passed since the user's previous
request, or when it falls on another calendar day than that previous request. Calendar days are
counted in UTC + ``Settings.day_offset_hours`` (Kuaishou's local time is UTC+8). All log rows of
one user with the same ``time_ms`` are one request, so they always share a session.

A session's id is the time of its first request (Unix ms). Each session gives one return: the
user coming back, which closes the user's previous session and carries the return gap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from sec_online.settings import Settings

logger = logging.getLogger(__name__)

MS_PER_MINUTE = 60_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
RETURN_COLUMNS = (
    "event_id",
    "user_id",
    "time_ms",
    "session_id",
    "previous_session_id",
    "previous_session_impressions",
    "gap_ms",
)


def calendar_day(time_ms: np.ndarray | pd.Series | int, day_offset_hours: int) -> np.ndarray:
    """Day number (days since 1970-01-01) of Unix ms times, in UTC + ``day_offset_hours``."""
    shifted = np.asarray(time_ms, dtype=np.int64) + day_offset_hours * MS_PER_HOUR
    return shifted // MS_PER_DAY


def assign_sessions(log: pd.DataFrame, settings: Settings) -> pd.DataFrame:
    """Return a copy of ``log`` with a ``session_id`` column (int64, Unix ms).

    ``log`` needs ``user_id`` and ``time_ms`` and may be in any row order; the copy keeps that
    order and the index. Sessions are built from these rows only, so a session that began before
    the first row starts again at that row.
    """
    users = log["user_id"].to_numpy(dtype=np.int64)
    times = log["time_ms"].to_numpy(dtype=np.int64)
    result = log.copy()
    result["session_id"] = _session_ids(users, times, settings)
    return result


def derive_returns(
    log_with_sessions: pd.DataFrame,
    settings: Settings,
    prior_activity: Mapping[int, int],
) -> pd.DataFrame:
    """Build one return row per session of the given rows, sorted by ``time_ms``.

    Parameters
    ----------
    log_with_sessions
        Log rows with ``session_id`` from ``assign_sessions``.
    settings
        Run settings. The session rule is already applied, so no field changes the result; the
        parameter keeps the call shape of ``assign_sessions``.
    prior_activity
        Each user's last request time (Unix ms) before these rows, from ``prior_activity_for``.
        It gives the gap of a user's first session here. A time at or after that session's
        start is not earlier activity and is ignored.

    Returns
    -------
    pandas.DataFrame
        Columns ``RETURN_COLUMNS``. ``time_ms`` equals ``session_id``. ``previous_session_id``
        and ``gap_ms`` are nullable ``Int64``, missing when no earlier activity is known.
        ``previous_session_impressions`` counts the previous session's rows among the given rows.
    """
    sessions = (
        log_with_sessions.groupby(["user_id", "session_id"], sort=True)["time_ms"]
        .agg(["max", "size"])
        .reset_index()
    )
    users = sessions["user_id"].to_numpy(dtype=np.int64)
    starts = sessions["session_id"].to_numpy(dtype=np.int64)
    last_request = sessions["max"].to_numpy(dtype=np.int64)
    rows = sessions["size"].to_numpy(dtype=np.int64)
    # Sessions are sorted by user then start, so the row above is the same user's previous session.
    has_previous = np.zeros(len(users), dtype=bool)
    has_previous[1:] = users[1:] == users[:-1]
    previous_start = np.roll(starts, 1)
    previous_last = np.roll(last_request, 1)
    previous_rows = np.roll(rows, 1)

    prior, prior_known = _lookup(prior_activity, users)
    first_gap_known = prior_known & (prior < starts)
    gap = np.where(has_previous, starts - previous_last, starts - prior)
    event_ids = (
        "return:" + sessions["user_id"].astype(str) + ":" + sessions["session_id"].astype(str)
    )
    returns = pd.DataFrame(
        {
            "event_id": event_ids.to_numpy(),
            "user_id": users,
            "time_ms": starts,
            "session_id": starts,
            "previous_session_id": pd.array(previous_start, dtype="Int64"),
            "previous_session_impressions": np.where(has_previous, previous_rows, 0),
            "gap_ms": pd.array(gap, dtype="Int64"),
        }
    )
    returns.loc[~has_previous, "previous_session_id"] = pd.NA
    returns.loc[~(has_previous | first_gap_known), "gap_ms"] = pd.NA
    return returns.sort_values("time_ms", kind="stable", ignore_index=True)


def prior_activity_for(
    full_log: pd.DataFrame, start_ms: int | None, last_seen: Mapping[int, int]
) -> dict[int, int]:
    """Collect each user's last known request time (Unix ms) before ``start_ms``.

    The time is the later of the user's last row before ``start_ms`` in ``full_log`` and their
    ``last_seen`` value (``sec_online.data.read_last_seen``). ``last_seen`` values at or after
    ``start_ms`` are not before the rows and are left out. With ``start_ms`` ``None`` the rows
    start at the log's beginning, so only ``last_seen`` counts.
    """
    prior = {
        int(user): int(time_ms)
        for user, time_ms in last_seen.items()
        if start_ms is None or time_ms < start_ms
    }
    if start_ms is None:
        return prior
    before = full_log.loc[full_log["time_ms"] < start_ms]
    latest = before.groupby("user_id")["time_ms"].max()
    for user, time_ms in zip(latest.index.tolist(), latest.tolist(), strict=True):
        prior[user] = max(time_ms, prior.get(user, time_ms))
    return prior


def _session_ids(users: np.ndarray, times: np.ndarray, settings: Settings) -> np.ndarray:
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    # lexsort is stable: sort by user, then time, keeping row order for equal pairs.
    order = np.lexsort((times, users))
    user, time = users[order], times[order]
    day = calendar_day(time, settings.day_offset_hours)
    first_of_user = np.r_[True, user[1:] != user[:-1]]
    # Rows of one request share time and day, so only a request's first row can start a session.
    # The row before that first row is the last row of the user's previous request.
    idle = np.r_[False, time[1:] - time[:-1] > settings.session_idle_minutes * MS_PER_MINUTE]
    new_day = np.r_[False, day[1:] != day[:-1]]
    starts = first_of_user | idle | new_day
    start_row = np.maximum.accumulate(np.where(starts, np.arange(len(time)), 0))
    session_ids = np.empty_like(times)
    session_ids[order] = time[start_row]
    return session_ids


def _lookup(values: Mapping[int, int], users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of each user in ``values`` (int64, 0 where missing) and whether it is there."""
    if not values:
        return np.zeros(len(users), dtype=np.int64), np.zeros(len(users), dtype=bool)
    keys = pd.Index(np.fromiter(values.keys(), dtype=np.int64, count=len(values)))
    known_values = np.fromiter(values.values(), dtype=np.int64, count=len(values))
    position = keys.get_indexer(users)
    found = position >= 0
    return np.where(found, known_values[position], 0), found
