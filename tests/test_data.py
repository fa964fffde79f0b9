"""KuaiRand file readers, on the shipped files and on small hand-written CSVs."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pytest

from sec_online.data import (
    LOG_DTYPES,
    DataError,
    event_ids,
    find_logs,
    find_video_features,
    read_last_seen,
    read_log,
    read_video_features,
)
from sec_online.settings import Settings

HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
    "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
    "is_profile_enter,is_rand,tab"
)
T0 = 1_651_000_000_000


def log_line(user: int, video: int, time_ms: int, click: int = 0, tab: int = 1) -> str:
    return f"{user},{video},20220426,1200,{time_ms},{click},0,0,0,0,0,0,1000,9000,0,0,0,0,{tab}"


def write(path: Path, lines: list[str], header: str = HEADER) -> Path:
    text = "\n".join([header, *lines]) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def shipped() -> Path:
    folder = Settings().data_dir
    if folder is None:
        pytest.skip("the shipped KuaiRand folder is not next to the project")
    return folder


@pytest.fixture(scope="module")
def shipped_log(shipped: Path) -> pd.DataFrame:
    return read_log(find_logs(shipped))


def test_shipped_log_rows_and_dtypes(shipped_log):
    assert len(shipped_log) == 171_671
    assert list(shipped_log.columns) == [*LOG_DTYPES, "event_id"]
    for name, dtype in LOG_DTYPES.items():
        assert str(shipped_log[name].dtype) == dtype, name
    assert shipped_log["time_ms"].is_monotonic_increasing
    assert shipped_log["user_id"].nunique() == 24_076


def test_shipped_event_ids_unique(shipped_log):
    assert shipped_log["event_id"].is_unique
    repeats = shipped_log["event_id"].str.contains("#", regex=False)
    triples = shipped_log[["user_id", "time_ms", "video_id"]]
    assert repeats.sum() == triples.duplicated().sum() == 4_739


def test_shipped_time_range_keeps_ids(shipped, shipped_log):
    start, end = T0, T0 + 86_400_000
    part = read_log(find_logs(shipped), start_ms=start, end_ms=end)
    expected = shipped_log[(shipped_log["time_ms"] >= start) & (shipped_log["time_ms"] < end)]
    assert len(part) > 10_000
    assert part["time_ms"].min() >= start
    assert part["time_ms"].max() < end
    assert part["event_id"].tolist() == expected["event_id"].tolist()


def test_shipped_side_files(shipped):
    features = read_video_features(shipped)
    assert len(features) == 7_583
    assert features["video_id"].is_monotonic_increasing
    last_seen = read_last_seen(shipped)
    assert len(last_seen) == 26_469
    assert last_seen[0] == 1_650_615_878_629


def test_plain_and_gzip_read_the_same(tmp_path):
    lines = [log_line(1, 10, T0 + 5), log_line(2, 11, T0), log_line(1, 12, T0 + 5, click=1)]
    plain = read_log(write(tmp_path / "log_standard_a.csv", lines))
    zipped = read_log(write(tmp_path / "log_standard_b.csv.gz", lines))
    pd.testing.assert_frame_equal(plain, zipped)
    assert plain["video_id"].tolist() == [11, 10, 12]


def test_ties_keep_file_order(tmp_path):
    first = write(tmp_path / "log_standard_1.csv", [log_line(1, 10, T0), log_line(1, 20, T0 + 9)])
    second = write(tmp_path / "log_standard_2.csv", [log_line(2, 30, T0), log_line(2, 40, T0 + 1)])
    log = read_log([first, second])
    assert log["video_id"].tolist() == [10, 30, 40, 20]
    assert log.index.tolist() == [0, 1, 2, 3]


def test_repeated_triples_get_suffixes(tmp_path):
    lines = [log_line(1, 10, T0), log_line(1, 10, T0, click=1), log_line(1, 10, T0)]
    lines.append(log_line(1, 10, T0 + 1))
    log = read_log(write(tmp_path / "log_standard_x.csv", lines))
    assert log["event_id"].tolist() == [
        f"1:{T0}:10",
        f"1:{T0}:10#1",
        f"1:{T0}:10#2",
        f"1:{T0 + 1}:10",
    ]
    assert event_ids(log.iloc[[3]]).tolist() == [f"1:{T0 + 1}:10"]


def test_missing_columns_named(tmp_path):
    header = HEADER.replace(",is_hate", "").replace(",tab", "")
    path = write(tmp_path / "log_standard_bad.csv", [], header=header)
    with pytest.raises(DataError) as caught:
        read_log(path)
    message = str(caught.value)
    assert str(path) in message
    assert "lacks the columns is_hate, tab" in message


def test_out_of_range_signal_rejected(tmp_path):
    line = log_line(7, 10, T0).replace(f"{T0},0,", f"{T0},2,")
    path = write(tmp_path / "log_standard_bad.csv", [log_line(1, 10, T0), line])
    with pytest.raises(DataError, match=r"column is_click must be in \[0, 1\].*value 2.*user_id 7"):
        read_log(path)


def test_text_in_integer_column_rejected(tmp_path):
    path = write(tmp_path / "log_standard_bad.csv", [log_line(1, 10, T0).replace("1000", "n/a")])
    with pytest.raises(DataError, match="cannot read .*log_standard_bad.csv"):
        read_log(path)


def test_find_logs_sorted_and_filtered(tmp_path):
    write(tmp_path / "log_standard_4_22_to_5_08.csv.gz", [])
    write(tmp_path / "log_standard_4_08_to_4_21.csv", [])
    write(tmp_path / "log_random_4_22_to_5_08.csv", [])
    (tmp_path / "log_standard_notes.txt").write_text("not a log")
    names = [path.name for path in find_logs(tmp_path)]
    assert names == ["log_standard_4_08_to_4_21.csv", "log_standard_4_22_to_5_08.csv.gz"]


def test_find_logs_errors(tmp_path):
    with pytest.raises(DataError, match="no interaction log in"):
        find_logs(tmp_path)
    with pytest.raises(DataError, match="data folder not found"):
        find_logs(tmp_path / "missing")
    write(tmp_path / "log_standard_a.csv", [])
    write(tmp_path / "log_standard_a.csv.gz", [])
    with pytest.raises(DataError, match="log_standard_a both as .csv and as .csv.gz"):
        find_logs(tmp_path)


def test_video_features_checks(tmp_path):
    with pytest.raises(DataError, match="found none"):
        find_video_features(tmp_path)
    header = "video_id,video_type,upload_type,video_duration,server_width,server_height,tag"
    write(
        tmp_path / "video_features_basic_x.csv",
        ["1,NORMAL,Web,1000.0,720,1280,1", "1,AD,Web,,,,"],
        header,
    )
    with pytest.raises(DataError, match="video_id 1 appears more than once"):
        read_video_features(tmp_path)


def test_last_seen_optional_and_merged(tmp_path):
    assert read_last_seen(tmp_path) == {}
    header = "user_id,last_time_ms"
    write(tmp_path / "user_last_seen_a.csv", ["1,100", "2,500", "1,300"], header)
    write(tmp_path / "user_last_seen_b.csv.gz", ["2,400", "3,50"], header)
    assert read_last_seen(tmp_path) == {1: 300, 2: 500, 3: 50}
