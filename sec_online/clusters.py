"""Video clusters, the discrete actions of the policies.

A policy picks a cluster of similar videos, not a single video. Clusters come from the release's
``video_features_basic_*`` file, one feature row per video:

1. ``tag``: multi-hot over every tag id in the file (``tag`` is a comma-separated list of ids;
   a missing tag gives all zeros).
2. ``video_duration``: ``log1p`` of the duration in ms, standardised to mean 0 and standard
   deviation 1 over the videos. A missing duration takes the median before standardising.
3. ``video_type``: one-hot over its values.
4. ``upload_type``: one-hot, with every value held by less than 1% of the videos pooled into one
   ``other`` column.
5. Aspect ratio: ``log(server_width / server_height)``, so portrait is negative and square is 0.
   A missing or non-positive width or height takes the median log ratio.

Only the duration is standardised, so every 0/1 column weighs the same in distances.

K-means then splits the rows into ``Settings.clusters`` clusters: k-means++ seeding with a NumPy
generator seeded by ``Settings.seed``, then at most ``MAX_ITERATIONS`` Lloyd iterations that stop
early once no assignment changes. A cluster left empty by an iteration is moved onto one of the
points farthest from the centroid they are assigned to. Videos are processed in ``video_id``
order, so on one machine the result depends only on the features file, the cluster count and the
seed.

``build_clusters`` caches the assignment as JSON under ``Settings.work_dir / "clusters"``, keyed
by a hash of the features file's bytes, the cluster count, the seed and ``FEATURE_VERSION``. Every
worker process then uses the same assignment, and a later call only reads the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from sec_online.data import find_video_features, read_video_features
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

# Bump when the feature rows or the k-means procedure change, so cached assignments are rebuilt.
FEATURE_VERSION = 1
MAX_ITERATIONS = 100
RARE_SHARE = 0.01
JSON_FORMAT = "video-clusters/1"


class VideoClusters:
    """Assignment of videos to clusters ``0 .. clusters - 1``.

    Parameters
    ----------
    assignments
        Cluster of each video, by video id.
    clusters
        Number of clusters, the size of the action space. Some clusters may hold no video.
    key
        Hash of the inputs that produced the assignment; empty for a hand-made one.
    """

    def __init__(self, assignments: Mapping[int, int], clusters: int, key: str = "") -> None:
        if clusters < 1:
            raise ValueError(f"clusters must be at least 1, got {clusters}")
        bad = [video for video, cluster in assignments.items() if not 0 <= cluster < clusters]
        if bad:
            raise ValueError(
                f"video {bad[0]} has cluster {assignments[bad[0]]}, outside 0..{clusters - 1}"
            )
        self.clusters = clusters
        self.key = key
        self._assignments = {int(video): int(cluster) for video, cluster in assignments.items()}

    def __len__(self) -> int:
        return len(self._assignments)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VideoClusters):
            return NotImplemented
        return self.clusters == other.clusters and self._assignments == other._assignments

    def __repr__(self) -> str:
        return f"VideoClusters(videos={len(self)}, clusters={self.clusters}, key={self.key!r})"

    def cluster_of(self, video_id: int) -> int | None:
        """Cluster of a video, or ``None`` when the features file has no row for it."""
        return self._assignments.get(int(video_id))

    def clusters_of(self, video_ids: Iterable[int]) -> np.ndarray:
        """Cluster of each video as an int64 array, with -1 for videos without features."""
        return np.fromiter(
            (self._assignments.get(int(video), -1) for video in video_ids), dtype=np.int64
        )

    def sizes(self) -> list[int]:
        """Number of videos in each cluster, indexed by cluster."""
        counts = np.bincount(
            np.fromiter(self._assignments.values(), dtype=np.int64), minlength=self.clusters
        )
        return counts.tolist()

    def to_json(self) -> str:
        """Serialise the assignment, with video ids in ascending order."""
        videos = sorted(self._assignments)
        payload = {
            "format": JSON_FORMAT,
            "clusters": self.clusters,
            "key": self.key,
            "video_ids": videos,
            "assignments": [self._assignments[video] for video in videos],
        }
        return json.dumps(payload, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> VideoClusters:
        """Load an assignment written by ``to_json``.

        Raises
        ------
        ValueError
            When the text is not such an assignment.
        """
        try:
            payload = json.loads(text)
            if payload.get("format") != JSON_FORMAT:
                raise ValueError(f"format {payload.get('format')!r}, expected {JSON_FORMAT!r}")
            videos, clusters = payload["video_ids"], payload["assignments"]
            if len(videos) != len(clusters):
                raise ValueError(f"{len(videos)} video ids but {len(clusters)} assignments")
            return cls(
                dict(zip(videos, clusters, strict=True)), payload["clusters"], payload["key"]
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"invalid video cluster JSON: {exc}") from exc


def build_clusters(settings: Settings) -> VideoClusters:
    """Build the video clusters of the data folder, or load them from the cache.

    The cache file is ``settings.work_dir / "clusters" / "<key>.json"``. It is written
    atomically, so processes that build at the same time never read a partial file.
    """
    features_path = find_video_features(settings.require_data_dir())
    key = cache_key(features_path, settings.clusters, settings.seed)
    cache_path = Path(settings.work_dir) / "clusters" / f"{key}.json"
    cached = _load_cached(cache_path)
    if cached is not None:
        logger.debug("loaded video clusters from %s", cache_path)
        return cached
    features = read_video_features(features_path.parent)
    clusters = fit_clusters(features, settings.clusters, settings.seed, key=key)
    _write_atomic(cache_path, clusters.to_json())
    logger.info(
        "built %d video clusters over %d videos from %s, cached at %s",
        settings.clusters,
        len(clusters),
        features_path,
        cache_path,
    )
    return clusters


def cache_key(features_path: Path, clusters: int, seed: int) -> str:
    """Hash of the features file's bytes, cluster count, seed and ``FEATURE_VERSION``."""
    digest = hashlib.sha256()
    digest.update(Path(features_path).read_bytes())
    digest.update(f"|clusters={clusters}|seed={seed}|features={FEATURE_VERSION}".encode())
    return digest.hexdigest()[:24]


def fit_clusters(features: pd.DataFrame, clusters: int, seed: int, key: str = "") -> VideoClusters:
    """Cluster videos by their features with seeded k-means.

    Parameters
    ----------
    features
        Frame as returned by ``sec_online.data.read_video_features``.
    clusters, seed
        Number of clusters and seed of the k-means++ seeding.
    key
        Stored in the result to name its inputs.

    Raises
    ------
    ValueError
        When there are fewer distinct feature rows than clusters.
    """
    features = features.sort_values("video_id", ignore_index=True)
    matrix, _ = feature_matrix(features)
    distinct = len(np.unique(matrix, axis=0))
    if distinct < clusters:
        raise ValueError(
            f"{len(matrix)} videos have only {distinct} distinct feature rows, fewer than "
            f"{clusters} clusters; lower SEC_CLUSTERS"
        )
    labels = kmeans(matrix, clusters, np.random.default_rng(seed))
    videos = features["video_id"].tolist()
    return VideoClusters(dict(zip(videos, labels.tolist(), strict=True)), clusters, key)


def feature_matrix(features: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Build the float64 feature matrix, shape ``(videos, columns)``, and the column names.

    Rows follow the row order of ``features``; the module docstring lists the columns.
    """
    blocks = [
        _tag_block(features["tag"]),
        _duration_block(features["video_duration"]),
        _one_hot(features["video_type"], "video_type", rare_share=0.0),
        _one_hot(features["upload_type"], "upload_type", rare_share=RARE_SHARE),
        _aspect_block(features["server_width"], features["server_height"]),
    ]
    frame = pd.concat(blocks, axis=1)
    return frame.to_numpy(dtype=np.float64), [str(name) for name in frame.columns]


def kmeans(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster label of each row of ``points`` (shape ``(n, d)``) by k-means++ and Lloyd."""
    centroids = _kmeans_plus_plus(points, clusters, rng)
    labels = np.full(len(points), -1, dtype=np.int64)
    for iteration in range(MAX_ITERATIONS):
        distances = _squared_distances(points, centroids)
        new_labels = distances.argmin(axis=1)
        if np.array_equal(new_labels, labels):
            logger.debug("k-means converged after %d iterations", iteration)
            break
        labels = new_labels
        centroids = _update_centroids(points, labels, distances, clusters)
    else:
        logger.debug("k-means stopped at the cap of %d iterations", MAX_ITERATIONS)
    return labels


def _kmeans_plus_plus(points: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    # Each next centre is drawn with probability proportional to its squared distance to the
    # nearest centre chosen so far (Arthur and Vassilvitskii, 2007).
    centroids = np.empty((clusters, points.shape[1]))
    centroids[0] = points[rng.integers(len(points))]
    nearest = _squared_distances(points, centroids[:1])[:, 0]
    for index in range(1, clusters):
        chosen = rng.choice(len(points), p=nearest / nearest.sum())
        centroids[index] = points[chosen]
        nearest = np.minimum(
            nearest, _squared_distances(points, centroids[index : index + 1])[:, 0]
        )
    return centroids


def _update_centroids(
    points: np.ndarray, labels: np.ndarray, distances: np.ndarray, clusters: int
) -> np.ndarray:
    counts = np.bincount(labels, minlength=clusters)
    sums = np.zeros((clusters, points.shape[1]))
    np.add.at(sums, labels, points)
    centroids = sums / np.maximum(counts, 1)[:, None]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        # Move each empty cluster onto a point that is far from the centroid it is assigned to.
        own = distances[np.arange(len(points)), labels]
        farthest = np.argsort(-own, kind="stable")[: len(empty)]
        centroids[empty] = points[farthest]
    return centroids


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clipped at 0 against rounding; shape (n, k).
    cross = points @ centroids.T
    squared = (points**2).sum(axis=1)[:, None] - 2 * cross + (centroids**2).sum(axis=1)[None, :]
    return np.maximum(squared, 0.0)


def _tag_block(tags: pd.Series) -> pd.DataFrame:
    dummies = tags.fillna("").str.get_dummies(sep=",")
    dummies = dummies.loc[:, [name for name in dummies.columns if name.strip()]]
    names = sorted(dummies.columns, key=lambda name: (len(name.strip()), name.strip()))
    return dummies[names].rename(columns=lambda name: f"tag={name.strip()}").astype(np.float64)


def _duration_block(durations: pd.Series) -> pd.DataFrame:
    logged = np.log1p(durations.where(durations >= 0))
    logged = logged.fillna(logged.median() if logged.notna().any() else 0.0)
    std = logged.std(ddof=0)
    scaled = (logged - logged.mean()) / (std if std > 0 else 1.0)
    return scaled.rename("log_duration").to_frame()


def _one_hot(values: pd.Series, name: str, rare_share: float) -> pd.DataFrame:
    values = values.fillna("UNKNOWN").astype(str)
    shares = values.value_counts(normalize=True)
    rare = shares.index[shares < rare_share]
    values = values.where(~values.isin(rare), "other")
    columns = sorted(values.unique())
    return pd.DataFrame(
        {f"{name}={column}": (values == column).astype(np.float64) for column in columns},
        index=values.index,
    )


def _aspect_block(width: pd.Series, height: pd.Series) -> pd.DataFrame:
    valid = (width > 0) & (height > 0)
    ratio = np.log(width.where(valid) / height.where(valid))
    ratio = ratio.fillna(ratio.median() if ratio.notna().any() else 0.0)
    return ratio.rename("log_aspect_ratio").to_frame()


def _load_cached(path: Path) -> VideoClusters | None:
    if not path.is_file():
        return None
    try:
        return VideoClusters.from_json(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable video cluster cache %s, rebuilding: %s", path, exc)
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
