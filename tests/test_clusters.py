"""Video feature rows, seeded k-means, the cluster cache and the shipped features."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sec_online.clusters import (
    VideoClusters,
    build_clusters,
    cache_key,
    feature_matrix,
    fit_clusters,
    kmeans,
)
from sec_online.data import find_video_features, read_video_features
from sec_online.settings import Settings

FEATURES_HEADER = "video_id,video_type,upload_type,video_duration,server_width,server_height,tag"


def features_frame(rows: list[tuple]) -> pd.DataFrame:
    columns = FEATURES_HEADER.split(",")
    frame = pd.DataFrame(rows, columns=columns)
    return frame.astype({"video_type": "string", "upload_type": "string", "tag": "string"})


def synthetic_features(videos: int, seed: int) -> pd.DataFrame:
    """Videos in a few well-separated groups of tags, durations and shapes."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 4, videos)
    tags = np.array(["1", "2,3", "4", "5,6"])[group]
    durations = np.array([5_000.0, 60_000.0, 300_000.0, 900_000.0])[group]
    rows = [
        (
            video,
            "NORMAL",
            "Web" if video % 2 else "LongImport",
            durations[video] * rng.uniform(0.9, 1.1),
            720.0,
            1280.0,
            tags[video],
        )
        for video in range(videos)
    ]
    return features_frame(rows)


def test_feature_columns_and_values():
    frame = features_frame(
        [
            (3, "NORMAL", "Web", 1000.0, 720.0, 1280.0, "2,10"),
            (1, "AD", "Kmovie", np.nan, 0.0, 1280.0, pd.NA),
            (2, "NORMAL", "Web", 100_000.0, 1280.0, 720.0, "2"),
        ]
    )
    matrix, names = feature_matrix(frame)
    assert names == [
        "tag=2",
        "tag=10",
        "log_duration",
        "video_type=AD",
        "video_type=NORMAL",
        "upload_type=Kmovie",
        "upload_type=Web",
        "log_aspect_ratio",
    ]
    assert matrix.shape == (3, 8)
    np.testing.assert_array_equal(matrix[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(matrix[:, 1], [1, 0, 0])
    durations = matrix[:, 2]
    assert durations.mean() == pytest.approx(0.0, abs=1e-12)
    assert durations.std() == pytest.approx(1.0)
    # The missing duration takes the median of log1p(1000) and log1p(100000).
    assert durations[1] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(matrix[:, 3], [0, 1, 0])
    aspect = matrix[:, 7]
    assert aspect[0] == pytest.approx(np.log(720 / 1280))
    assert aspect[2] == pytest.approx(np.log(1280 / 720))
    # Width 0 is invalid, so the ratio takes the median of the valid ones.
    assert aspect[1] == pytest.approx(0.0, abs=1e-12)


def test_rare_upload_types_pooled():
    rows = [(video, "NORMAL", "Web", 1000.0, 720.0, 1280.0, "1") for video in range(199)]
    rows.append((199, "NORMAL", "FollowShoot", 1000.0, 720.0, 1280.0, "1"))
    matrix, names = feature_matrix(features_frame(rows))
    upload = [name for name in names if name.startswith("upload_type=")]
    assert upload == ["upload_type=Web", "upload_type=other"]
    assert matrix[199, names.index("upload_type=other")] == 1.0
    assert matrix[:199, names.index("upload_type=other")].sum() == 0.0


def test_kmeans_finds_separated_groups():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat([0, 1, 2], 50)
    points = centres[truth] + rng.normal(0.0, 0.3, (150, 2))
    labels = kmeans(points, 3, np.random.default_rng(0))
    for group in range(3):
        assert len(set(labels[truth == group])) == 1
    assert len(set(labels)) == 3


def test_fit_deterministic_under_seed():
    features = synthetic_features(300, seed=1)
    first = fit_clusters(features, 6, seed=7)
    shuffled = features.sample(frac=1.0, random_state=5)
    again = fit_clusters(shuffled, 6, seed=7)
    assert first == again
    assert sum(first.sizes()) == 300
    assert len(first.sizes()) == 6


def test_too_few_distinct_rows():
    rows = [(video, "NORMAL", "Web", 1000.0, 720.0, 1280.0, "1") for video in range(10)]
    with pytest.raises(ValueError, match="only 1 distinct feature rows, fewer than 4 clusters"):
        fit_clusters(features_frame(rows), 4, seed=0)


def test_lookup_and_json_round_trip():
    clusters = VideoClusters({5: 1, 2: 0, 9: 1}, clusters=3, key="abc")
    assert clusters.cluster_of(5) == 1
    assert clusters.cluster_of(np.int64(2)) == 0
    assert clusters.cluster_of(4) is None
    np.testing.assert_array_equal(clusters.clusters_of([9, 4, 2]), [1, -1, 0])
    assert clusters.sizes() == [1, 2, 0]
    loaded = VideoClusters.from_json(clusters.to_json())
    assert loaded == clusters
    assert loaded.key == "abc"


def test_invalid_json_and_assignment():
    with pytest.raises(ValueError, match="invalid video cluster JSON"):
        VideoClusters.from_json("{not json")
    with pytest.raises(ValueError, match="format"):
        VideoClusters.from_json('{"format": "other"}')
    with pytest.raises(ValueError, match="video 7 has cluster 3, outside 0..2"):
        VideoClusters({7: 3}, clusters=3)


@pytest.fixture
def small_data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    synthetic_features(120, seed=2).to_csv(folder / "video_features_basic_test.csv", index=False)
    return folder


def test_build_caches_by_key(small_data, tmp_path):
    settings = Settings(data_dir=small_data, work_dir=tmp_path / "work", clusters=4, seed=3)
    built = build_clusters(settings)
    key = cache_key(find_video_features(small_data), 4, 3)
    cache_file = tmp_path / "work" / "clusters" / f"{key}.json"
    assert built.key == key
    assert cache_file.is_file()
    # A later call reads the cache: a changed cache file shows through.
    changed = VideoClusters(dict.fromkeys(range(120), 0), clusters=4, key=key)
    cache_file.write_text(changed.to_json())
    assert build_clusters(settings) == changed


def test_cache_key_inputs(small_data):
    path = find_video_features(small_data)
    key = cache_key(path, 4, 3)
    assert cache_key(path, 4, 3) == key
    assert cache_key(path, 5, 3) != key
    assert cache_key(path, 4, 4) != key
    path.write_bytes(path.read_bytes() + b"120,NORMAL,Web,1000.0,720.0,1280.0,1\n")
    assert cache_key(path, 4, 3) != key


def test_corrupt_cache_rebuilt(small_data, tmp_path, caplog):
    settings = Settings(data_dir=small_data, work_dir=tmp_path / "work", clusters=4, seed=3)
    built = build_clusters(settings)
    cache_file = next((tmp_path / "work" / "clusters").glob("*.json"))
    cache_file.write_text('{"format": "video-clusters/1", "clusters": 4')
    with caplog.at_level(logging.WARNING, logger="sec_online.clusters"):
        rebuilt = build_clusters(settings)
    assert rebuilt == built
    assert "ignoring unreadable video cluster cache" in caplog.text
    assert VideoClusters.from_json(cache_file.read_text()) == built


def test_same_assignment_in_new_work_dir(small_data, tmp_path):
    settings = Settings(data_dir=small_data, work_dir=tmp_path / "one", clusters=4, seed=3)
    first = build_clusters(settings)
    shutil.rmtree(tmp_path / "one")
    second = build_clusters(dataclasses.replace(settings, work_dir=tmp_path / "two"))
    assert first == second


def test_shipped_clusters(tmp_path):
    settings = Settings(work_dir=tmp_path)
    if settings.data_dir is None:
        pytest.skip("the shipped KuaiRand folder is not next to the project")
    clusters = build_clusters(settings)
    sizes = clusters.sizes()
    assert len(sizes) == settings.clusters
    assert sum(sizes) == len(read_video_features(settings.data_dir)) == 7_583
    assert min(sizes) > 0
    assert max(sizes) < 7_583 / 4
