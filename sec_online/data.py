"""Reading KuaiRand files: the interaction log, video features and users' last-seen times.

The readers expect the file names and columns of the KuaiRand releases (Pure, 1K, 27K), which
the shipped ten-day slice keeps. Files may be plain or gzip-compressed CSV (``.csv`` or
``.csv.gz``).

Every log row gets an ``event_id`` of the form ``"{user_id}:{time_ms}:{video_id}"``. The log
contains exact repeats of that triple (one video logged twice for one request), so the n-th
repeat in file order gets the suffix ``#n``. A repeat shares its time with the original, so any
time range contains all repeats of a triple or none of them. An event's id therefore does not
depend on the range read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from sec_online.schemas import MAX_TIME_MS, MIN_TIME_MS

logger = logging.getLogger(__name__)

LOG_PATTERN = "log_standard_*"
VIDEO_FEATURES_PATTERN = "video_features_basic_*"
LAST_SEEN_PATTERN = "user_last_seen_*"

# Columns kept from the log and their dtypes. Times and play/duration are in milliseconds.
LOG_DTYPES: dict[str, str] = {
    "user_id": "int32",
    "video_id": "int32",
    "time_ms": "int64",
    "is_click": "int8",
    "long_view": "int8",
    "is_like": "int8",
    "is_comment": "int8",
    "is_forward": "int8",
    "is_follow": "int8",
    "is_hate": "int8",
    "play_time_ms": "int64",
    "duration_ms": "int64",
    "tab": "int16",
    "date": "int32",
}
# The seven feedback signals, in the order of ``sec_online.schemas.FEEDBACK_SIGNALS``.
SIGNAL_COLUMNS = (
    "is_click",
    "long_view",
    "is_like",
    "is_comment",
    "is_forward",
    "is_follow",
    "is_hate",
)
VIDEO_FEATURE_COLUMNS = (
    "video_id",
    "video_type",
    "upload_type",
    "video_duration",
    "server_width",
    "server_height",
    "tag",
)
LAST_SEEN_COLUMNS = ("user_id", "last_time_ms")
# Valid value range of each log column, inclusive.
_LOG_RANGES: dict[str, tuple[int, int]] = {
    **dict.fromkeys(SIGNAL_COLUMNS, (0, 1)),
    "user_id": (0, np.iinfo(np.int32).max),
    "video_id": (0, np.iinfo(np.int32).max),
    "time_ms": (MIN_TIME_MS, MAX_TIME_MS),
    "play_time_ms": (0, np.iinfo(np.int64).max),
    "duration_ms": (0, np.iinfo(np.int64).max),
    "tab": (0, np.iinfo(np.int16).max),
    "date": (20000101, 21000101),
}
_CSV_NAME = re.compile(r"\.csv(\.gz)?$")


class DataError(ValueError):
    """A KuaiRand file is missing, or has missing columns or invalid values."""


def find_logs(folder: Path) -> list[Path]:
    """Find the standard interaction logs in a data folder, sorted by file name.

    KuaiRand names its logs by date range (``log_standard_4_08_to_4_21_pure.csv``), so name
    order is time order. Random-exposure logs (``log_random_*``) are not included.

    Raises
    ------
    DataError
        When the folder has no ``log_standard_*.csv[.gz]`` file, or has one log both plain and
        gzip-compressed, which would read every row twice.
    """
    paths = _find_csv(folder, LOG_PATTERN)
    if not paths:
        raise DataError(
            f"no interaction log in {folder}: expected log_standard_*.csv or "
            "log_standard_*.csv.gz; set SEC_DATA_DIR to a folder with KuaiRand logs"
        )
    return paths


def find_video_features(folder: Path) -> Path:
    """Find the one ``video_features_basic_*.csv[.gz]`` file of a data folder.

    Raises
    ------
    DataError
        When there is no such file, or more than one.
    """
    paths = _find_csv(folder, VIDEO_FEATURES_PATTERN)
    if len(paths) != 1:
        found = ", ".join(path.name for path in paths) or "none"
        raise DataError(
            f"expected one video_features_basic_*.csv[.gz] file in {folder}, found {found}; "
            "keep the features file of the release whose logs are in the folder"
        )
    return paths[0]


def read_log(
    path_or_paths: Path | str | Iterable[Path | str],
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> pd.DataFrame:
    """Read interaction logs into one frame sorted by request time.

    Parameters
    ----------
    path_or_paths
        One log file or several, read in the given order.
    start_ms, end_ms
        Keep rows with ``start_ms <= time_ms < end_ms`` (Unix ms); ``None`` leaves that side open.

    Returns
    -------
    pandas.DataFrame
        The columns of ``LOG_DTYPES`` with those dtypes, plus ``event_id``, with a fresh
        ``RangeIndex``. The sort by ``time_ms`` is stable, so rows with the same time keep their
        file order.

    Raises
    ------
    DataError
        When a file lacks columns, or contains values that are not integers or are out of range.
    """
    paths = [Path(path_or_paths)] if isinstance(path_or_paths, str | Path) else list(path_or_paths)
    if not paths:
        raise DataError("read_log needs at least one log file")
    frames = [_read_one_log(path, start_ms, end_ms) for path in paths]
    log = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    log = log.sort_values("time_ms", kind="stable", ignore_index=True)
    log["event_id"] = event_ids(log)
    return log


def event_ids(log: pd.DataFrame) -> pd.Series:
    """Build the unique event id of each log row, in the row order of ``log``.

    The first row of a ``(user_id, time_ms, video_id)`` triple gets ``"user:time:video"``, the
    n-th repeat after it gets ``"user:time:video#n"``.
    """
    keys = ["user_id", "time_ms", "video_id"]
    base = (
        log["user_id"].astype(str)
        + ":"
        + log["time_ms"].astype(str)
        + ":"
        + log["video_id"].astype(str)
    )
    repeat = log.groupby(keys, sort=False).cumcount()
    suffix = ("#" + repeat.astype(str)).where(repeat > 0, "")
    return (base + suffix).rename("event_id")


def read_video_features(folder: Path) -> pd.DataFrame:
    """Read the video features needed for clustering, one row per video.

    Returns
    -------
    pandas.DataFrame
        Columns ``VIDEO_FEATURE_COLUMNS``, sorted by ``video_id``. ``tag`` is a comma-separated
        list of tag ids or missing, ``video_duration`` is in ms and may be missing.

    Raises
    ------
    DataError
        When the file is missing, lacks columns or lists a video twice.
    """
    path = find_video_features(folder)
    _require_columns(path, VIDEO_FEATURE_COLUMNS)
    dtypes = {
        "video_id": "int64",
        "video_type": "string",
        "upload_type": "string",
        "video_duration": "float64",
        "server_width": "float64",
        "server_height": "float64",
        "tag": "string",
    }
    features = _read_csv(path, list(VIDEO_FEATURE_COLUMNS), dtypes)
    repeated = features["video_id"][features["video_id"].duplicated()]
    if not repeated.empty:
        raise DataError(
            f"{path}: video_id {int(repeated.iloc[0])} appears more than once "
            f"({repeated.nunique()} repeated ids); each video needs exactly one row"
        )
    return features.sort_values("video_id", ignore_index=True)


def read_last_seen(folder: Path) -> dict[int, int]:
    """Read each user's last request time (Unix ms) before the logs start.

    The file ``user_last_seen_*.csv[.gz]`` is optional, and an empty dict means no such file.
    With several files, a user's latest time wins.
    """
    last_seen: dict[int, int] = {}
    for path in _find_csv(folder, LAST_SEEN_PATTERN):
        _require_columns(path, LAST_SEEN_COLUMNS)
        frame = _read_csv(path, list(LAST_SEEN_COLUMNS), dict.fromkeys(LAST_SEEN_COLUMNS, "int64"))
        latest = frame.groupby("user_id")["last_time_ms"].max()
        for user_id, time_ms in zip(latest.index.tolist(), latest.tolist(), strict=True):
            last_seen[user_id] = max(time_ms, last_seen.get(user_id, time_ms))
    return last_seen


def _find_csv(folder: Path, pattern: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}; set SEC_DATA_DIR to a KuaiRand folder")
    paths = sorted(
        path for path in folder.glob(pattern) if path.is_file() and _CSV_NAME.search(path.name)
    )
    stems = [_CSV_NAME.sub("", path.name) for path in paths]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise DataError(
            f"{folder} has {twice[0]} both as .csv and as .csv.gz; remove one copy so its rows "
            "are read once"
        )
    return paths


def _read_one_log(path: Path, start_ms: int | None, end_ms: int | None) -> pd.DataFrame:
    _require_columns(path, tuple(LOG_DTYPES))
    # Read as int64 first: a narrow dtype in read_csv would silently wrap on out-of-range values.
    log = _read_csv(path, list(LOG_DTYPES), dict.fromkeys(LOG_DTYPES, "int64"))
    if start_ms is not None:
        log = log[log["time_ms"] >= start_ms]
    if end_ms is not None:
        log = log[log["time_ms"] < end_ms]
    _validate_log(path, log)
    logger.debug("read %d log rows from %s", len(log), path)
    return log[list(LOG_DTYPES)].astype(LOG_DTYPES)


def _validate_log(path: Path, log: pd.DataFrame) -> None:
    for name, (low, high) in _LOG_RANGES.items():
        valid = log[name].between(low, high)
        if not valid.all():
            row = int(np.flatnonzero(~valid.to_numpy())[0])
            raise DataError(
                f"{path}: column {name} must be in [{low}, {high}], but {int((~valid).sum())} "
                f"rows are not, the first with value {log[name].iloc[row]} (user_id "
                f"{log['user_id'].iloc[row]}, time_ms {log['time_ms'].iloc[row]})"
            )


def _require_columns(path: Path, columns: Iterable[str]) -> None:
    try:
        header = pd.read_csv(path, nrows=0)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read the header of {path}: {exc}") from exc
    missing = [name for name in columns if name not in header.columns]
    if missing:
        raise DataError(
            f"{path} lacks the columns {', '.join(missing)}; it has "
            f"{', '.join(map(str, header.columns))}. Use a KuaiRand file with the release's "
            "column names"
        )


def _read_csv(path: Path, columns: list[str], dtypes: dict[str, str]) -> pd.DataFrame:
    try:
        return pd.read_csv(path, usecols=columns, dtype=dtypes)
    except (OSError, ValueError, EOFError) as exc:
        # ValueError covers a missing value or text in an integer column.
        raise DataError(
            f"cannot read {path}: {exc}; check that the file is a KuaiRand CSV"
        ) from exc
