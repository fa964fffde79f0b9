"""Settings of sec-online, read once from environment variables.

Every field has a default and one environment variable, named in its comment. Code takes a
``Settings`` object instead of reading the environment itself, so tests build their own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "kuairand-pure"
ENV_PREFIX = "SEC_"


class SettingsError(ValueError):
    """An environment variable contains a value that the setting cannot take."""


def _default_data_dir() -> Path | None:
    return SHIPPED_DATA_DIR if SHIPPED_DATA_DIR.is_dir() else None


@dataclass(frozen=True)
class Settings:
    # SEC_DATA_DIR: folder with KuaiRand files (log_standard_*.csv[.gz], video features).
    data_dir: Path | None = field(default_factory=_default_data_dir)
    # SEC_BOOTSTRAP_SERVERS: external Kafka cluster, "host:port[,host:port]". Empty means the
    # project starts its own broker on 127.0.0.1:broker_port.
    bootstrap_servers: str = ""
    # SEC_BROKER_PORT / SEC_CONTROLLER_PORT: listener ports of the managed broker.
    broker_port: int = 9092
    controller_port: int = 9093
    # SEC_KAFKA_VERSION: Apache Kafka release whose jars are resolved from Maven Central.
    kafka_version: str = "4.1.1"
    # SEC_CACHE_DIR: downloaded jars and the managed broker's data and logs.
    cache_dir: Path = PROJECT_ROOT / ".cache"
    # SEC_WORK_DIR: worker tables (RocksDB), model checkpoints, cluster assignments.
    work_dir: Path = PROJECT_ROOT / ".sec-online"
    # SEC_REPORTS_DIR: summaries and plots written by the main job.
    reports_dir: Path = PROJECT_ROOT / "reports"
    # SEC_APP_ID: Faust application id, also the consumer group id.
    app_id: str = "sec-online"
    # SEC_TOPIC_PREFIX: prepended to every topic name, so runs can share a broker.
    topic_prefix: str = ""
    # SEC_PARTITIONS: partitions of the user-keyed topics (impressions, returns).
    partitions: int = 4
    # SEC_WEB_PORT / SEC_WEB_HOST: port and bind address of the worker's HTTP server (Faust
    # web). Containers set the host to 0.0.0.0 so the port can be published.
    web_port: int = 6066
    web_host: str = "127.0.0.1"
    # SEC_LEVELS: number K of retention levels, one expert head each.
    levels: int = 3
    # SEC_CLUSTERS: number of video clusters, the discrete action space.
    clusters: int = 32
    # SEC_SESSION_IDLE_MINUTES: idle time after which the next request opens a new session.
    session_idle_minutes: int = 30
    # SEC_DAY_OFFSET_HOURS: offset from UTC of the platform's calendar day (Kuaishou: UTC+8).
    day_offset_hours: int = 8
    # SEC_SCORE_DECAY: weight of the newest return in the retention score's moving average.
    score_decay: float = 0.3
    # SEC_ENTROPY_WEIGHT: lambda, weight of the negative action entropy in the expert loss.
    entropy_weight: float = 0.05
    # SEC_HIDDEN_SIZE: width of the shared state encoder.
    hidden_size: int = 64
    # SEC_BATCH_SIZE: samples in one fine-tuning step.
    batch_size: int = 64
    # SEC_LEARNING_RATE: Adam learning rate of the experts.
    learning_rate: float = 1e-3
    # SEC_PUBLISH_EVERY_SAMPLES / SEC_PUBLISH_EVERY_SECONDS: publish a policy update after this
    # many new samples, or after this many seconds when at least one new sample arrived.
    publish_every_samples: int = 2000
    publish_every_seconds: float = 10.0
    # SEC_CENTROIDS_PER_LEVEL: k-means centroids of encoded expert states per level.
    centroids_per_level: int = 4
    # SEC_DELTA_QUANTILE: delta_k is this quantile of a level's state-to-centroid distances.
    delta_quantile: float = 0.9
    # SEC_SEED: seed of every random generator (clusters, model initialisation, k-means).
    seed: int = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``SEC_*`` variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for item in dataclasses.fields(cls):
            name = ENV_PREFIX + item.name.upper()
            if name in environ:
                values[item.name] = _parse(name, environ[name], item.type)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ``SettingsError`` for values no run could use."""
        checks = [
            (self.levels >= 1, "SEC_LEVELS must be at least 1"),
            (self.clusters >= 2, "SEC_CLUSTERS must be at least 2"),
            (self.partitions >= 1, "SEC_PARTITIONS must be at least 1"),
            (self.batch_size >= 1, "SEC_BATCH_SIZE must be at least 1"),
            (0 < self.score_decay <= 1, "SEC_SCORE_DECAY must be in (0, 1]"),
            (0 < self.delta_quantile <= 1, "SEC_DELTA_QUANTILE must be in (0, 1]"),
            (self.entropy_weight >= 0, "SEC_ENTROPY_WEIGHT must not be negative"),
            (self.session_idle_minutes >= 1, "SEC_SESSION_IDLE_MINUTES must be at least 1"),
            (self.hidden_size >= 1, "SEC_HIDDEN_SIZE must be at least 1"),
            (self.learning_rate > 0, "SEC_LEARNING_RATE must be positive"),
            (self.centroids_per_level >= 1, "SEC_CENTROIDS_PER_LEVEL must be at least 1"),
            (self.publish_every_samples >= 1, "SEC_PUBLISH_EVERY_SAMPLES must be at least 1"),
            (self.publish_every_seconds > 0, "SEC_PUBLISH_EVERY_SECONDS must be positive"),
            (-24 < self.day_offset_hours < 24, "SEC_DAY_OFFSET_HOURS must be within (-24, 24)"),
        ]
        for name in ("broker_port", "controller_port", "web_port"):
            port = getattr(self, name)
            checks.append((1 <= port <= 65535, f"SEC_{name.upper()}={port} is not a TCP port"))
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    @property
    def managed_broker(self) -> bool:
        """True when no external cluster is configured and the project runs its own broker."""
        return not self.bootstrap_servers

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers that clients connect to."""
        return self.bootstrap_servers or f"127.0.0.1:{self.broker_port}"

    def topic(self, name: str) -> str:
        """Full topic name with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def require_data_dir(self) -> Path:
        """Return the data folder, or raise with the fix when it is missing."""
        if self.data_dir is None:
            raise SettingsError(
                "no data folder: set SEC_DATA_DIR to a folder with KuaiRand files "
                "(log_standard_*.csv[.gz] and video_features_basic_*.csv[.gz]); "
                "README.md says where to download KuaiRand"
            )
        if not self.data_dir.is_dir():
            raise SettingsError(f"data folder not found: SEC_DATA_DIR={self.data_dir}")
        return self.data_dir

    def public_dict(self) -> dict[str, object]:
        """Effective settings as plain JSON values."""
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(self).items()
        }


def _parse(name: str, raw: str, annotation: object) -> object:
    kind = str(annotation)
    try:
        if "Path" in kind:
            return Path(raw).expanduser() if raw else None
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"invalid value {raw!r} for {name}: expected {kind}") from exc
    return raw
