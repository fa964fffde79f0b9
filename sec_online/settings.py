"""Settings of sec-online: one typed object, read from defaults, a TOML file and the environment.

Each field of ``Settings`` declares its type, default, unit and description in one place;
``sec-online config --markdown`` renders them as docs/configuration.md. A value comes from, in
rising precedence:

1. the default below;
2. the TOML file named by ``SEC_CONFIG_FILE`` (or ``sec-online --config FILE``), with the field
   names as keys (``partitions = 8``);
3. the environment variable ``SEC_<FIELD NAME IN CAPITALS>`` (``SEC_PARTITIONS=8``).

Code takes a ``Settings`` object instead of reading the environment itself, so tests build their
own with ``Settings(...)`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data" / "kuairand-pure"
ENV_PREFIX = "SEC_"
CONFIG_FILE_ENV = "SEC_CONFIG_FILE"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """A setting has a value that no run could use, or the settings file cannot be read."""


def _default_data_dir() -> Path | None:
    return SHIPPED_DATA_DIR if SHIPPED_DATA_DIR.is_dir() else None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    unit: str = "",
    factory: Any = dataclasses.MISSING,
) -> Any:
    """Return a dataclass field that carries its description and unit."""
    metadata = {"help": help, "unit": unit}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Every setting of the product; ``sec-online config --markdown`` lists them."""

    data_dir: Path | None = setting(
        factory=_default_data_dir,
        help="folder with KuaiRand files (log_standard_*.csv[.gz], video_features_basic_*); "
        "default: ../shared/data/kuairand-pure beside the project when it exists",
        unit="path",
    )
    bootstrap_servers: str = setting(
        "",
        help="external Kafka cluster as host:port[,host:port]; empty: the project starts its "
        "own broker on 127.0.0.1:broker_port",
    )
    broker_port: int = setting(9092, help="listener port of the managed broker", unit="TCP port")
    controller_port: int = setting(
        9093, help="KRaft controller port of the managed broker", unit="TCP port"
    )
    kafka_version: str = setting(
        "4.1.1", help="Apache Kafka release whose jars are fetched from Maven Central"
    )
    cache_dir: Path = setting(
        PROJECT_ROOT / ".cache",
        help="downloaded jars and the managed broker's data and logs",
        unit="path",
    )
    work_dir: Path = setting(
        PROJECT_ROOT / ".sec-online",
        help="worker tables (RocksDB), model checkpoints, video cluster assignments",
        unit="path",
    )
    reports_dir: Path = setting(
        PROJECT_ROOT / "reports", help="summaries and plots of the jobs", unit="path"
    )
    app_id: str = setting(
        "sec-online", help="Faust application id; also the workers' consumer group id"
    )
    topic_prefix: str = setting(
        "", help="prepended to every topic name, so several runs can share one cluster"
    )
    partitions: int = setting(
        4, help="partitions of the user-keyed topics (impressions, returns)", unit="count"
    )
    events_per_batch: int = setting(
        2000,
        help="most records of one topic that a worker applies as one batch: one state read and "
        "one changelog record per user, one wait for the batch's samples",
        unit="records",
    )
    batch_wait_seconds: float = setting(
        0.25,
        help="maximum wait for a batch to fill before the records received so far are applied",
        unit="seconds",
    )
    web_port: int = setting(6066, help="port of the worker's HTTP server", unit="TCP port")
    web_host: str = setting(
        "127.0.0.1",
        help="bind address of the worker's HTTP server; containers use 0.0.0.0 to publish it",
    )
    web_advertised_host: str = setting(
        "",
        help="host name that other workers use to forward page requests to this one; empty: "
        "web_host, or this machine's host name when web_host is 0.0.0.0",
    )
    levels: int = setting(3, help="number K of retention levels, one expert head each")
    clusters: int = setting(
        32, help="number of video clusters, the discrete action space", unit="count"
    )
    session_idle_minutes: int = setting(
        30, help="idle time after which the next request opens a new session", unit="minutes"
    )
    day_offset_hours: int = setting(
        8, help="offset from UTC of the platform's calendar day (Kuaishou: UTC+8)", unit="hours"
    )
    score_decay: float = setting(
        0.3, help="weight of the newest return in the retention score's moving average"
    )
    entropy_weight: float = setting(
        0.05, help="lambda, weight of the negative action entropy in the expert loss"
    )
    hidden_size: int = setting(64, help="width of the shared state encoder", unit="units")
    batch_size: int = setting(64, help="samples in one fine-tuning step", unit="samples")
    learning_rate: float = setting(1e-3, help="Adam learning rate of the experts")
    publish_every_samples: int = setting(
        2000, help="publish a policy update after this many new samples", unit="samples"
    )
    publish_every_seconds: float = setting(
        1.0,
        help="publish a policy update after this long when at least one new sample arrived",
        unit="seconds",
    )
    centroids_per_level: int = setting(
        4, help="k-means centroids of encoded expert states per level", unit="count"
    )
    delta_quantile: float = setting(
        0.9, help="delta_k is this quantile of a level's state-to-centroid distances"
    )
    seed: int = setting(
        0, help="seed of every random generator (clusters, model initialisation, k-means)"
    )
    log_level: str = setting(
        "INFO", help="lowest level of the log lines printed: DEBUG, INFO, WARNING or ERROR"
    )
    log_format: str = setting(
        "text",
        help="log lines as text (time, level, component, message, ids) or json (one object "
        "per line with the same fields)",
    )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, config_file: Path | None = None
    ) -> Settings:
        """Build settings from the optional TOML file and ``SEC_*`` variables, then validate."""
        return cls.load(environ, config_file)[0]

    @classmethod
    def load(
        cls, environ: Mapping[str, str] | None = None, config_file: Path | None = None
    ) -> tuple[Settings, dict[str, str]]:
        """Settings and where each value came from: ``default``, the file's path, or ``env``.

        ``config_file`` overrides ``SEC_CONFIG_FILE``.
        """
        environ = os.environ if environ is None else environ
        if config_file is None and environ.get(CONFIG_FILE_ENV):
            config_file = Path(environ[CONFIG_FILE_ENV]).expanduser()
        values: dict[str, Any] = {}
        sources = {item.name: "default" for item in dataclasses.fields(cls)}
        if config_file is not None:
            for name, value in _read_file(config_file).items():
                values[name] = value
                sources[name] = str(config_file)
        for item in dataclasses.fields(cls):
            name = env_name(item.name)
            if name in environ:
                values[item.name] = _parse(name, environ[name], _field_type(item))
                sources[item.name] = "env"
        settings = cls(**values)
        settings.validate()
        return settings, sources

    def validate(self) -> None:
        """Raise ``SettingsError`` for values no run could use."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"{env_name(item.name)}={value} is not a finite number")
        checks = [
            (self.levels >= 1, "SEC_LEVELS must be at least 1"),
            (self.clusters >= 2, "SEC_CLUSTERS must be at least 2"),
            (self.partitions >= 1, "SEC_PARTITIONS must be at least 1"),
            (self.batch_size >= 1, "SEC_BATCH_SIZE must be at least 1"),
            (self.events_per_batch >= 1, "SEC_EVENTS_PER_BATCH must be at least 1"),
            (self.batch_wait_seconds > 0, "SEC_BATCH_WAIT_SECONDS must be positive"),
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
            (self.log_format in ("text", "json"), "SEC_LOG_FORMAT must be text or json"),
            (
                self.log_level in LOG_LEVELS,
                f"SEC_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}",
            ),
        ]
        for name in ("broker_port", "controller_port", "web_port"):
            port = getattr(self, name)
            checks.append((1 <= port <= 65535, f"{env_name(name)}={port} is not a TCP port"))
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

    @property
    def advertised_host(self) -> str:
        """Host name in this worker's URL as other workers see it (``web_advertised_host``)."""
        if self.web_advertised_host:
            return self.web_advertised_host
        if self.web_host in ("0.0.0.0", "::", ""):
            return socket.gethostname()
        return self.web_host

    def topic(self, name: str) -> str:
        """Full topic name with the configured prefix."""
        return f"{self.topic_prefix}{name}"

    def require_data_dir(self) -> Path:
        """Return the data folder, or raise with the fix when it is missing."""
        if self.data_dir is None:
            raise SettingsError(
                "no data folder: set SEC_DATA_DIR to a folder with KuaiRand files "
                "(log_standard_*.csv[.gz] and video_features_basic_*.csv[.gz]); "
                "docs/data.md says where to download KuaiRand"
            )
        if not self.data_dir.is_dir():
            raise SettingsError(f"data folder not found: SEC_DATA_DIR={self.data_dir}")
        return self.data_dir

    def public_dict(self) -> dict[str, object]:
        """Effective settings as plain JSON values. No setting contains a credential."""
        return {item.name: _plain(getattr(self, item.name)) for item in dataclasses.fields(self)}


def env_name(field_name: str) -> str:
    """Environment variable of a setting: ``partitions`` -> ``SEC_PARTITIONS``."""
    return ENV_PREFIX + field_name.upper()


def describe() -> list[dict[str, str]]:
    """Return one row per setting: name, variable, type, unit, default and description."""
    rows = []
    for item in dataclasses.fields(Settings):
        if item.default_factory is not dataclasses.MISSING:
            default = "see description"
        else:
            default = _plain(item.default)
        rows.append(
            {
                "name": item.name,
                "env": env_name(item.name),
                "type": _field_type(item).__name__,
                "unit": item.metadata["unit"],
                "default": "" if default is None else str(default),
                "help": item.metadata["help"],
            }
        )
    return rows


def describe_markdown() -> str:
    """Render the settings table of docs/configuration.md."""
    lines = [
        "| Setting | Variable | Type | Unit | Default | Meaning |",
        "|---|---|---|---|---|---|",
    ]
    for row in describe():
        default = row["default"].replace(str(PROJECT_ROOT), "<project>")
        cells = [row["name"], row["env"], row["type"], row["unit"], default, row["help"]]
        lines.append(
            "| " + " | ".join(f"`{c}`" if i < 2 else c for i, c in enumerate(cells)) + " |"
        )
    return "\n".join(lines) + "\n"


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def _field_type(item: dataclasses.Field) -> type:
    """Return the non-None type of a field: ``Path | None`` -> ``Path``."""
    hint = typing.get_type_hints(Settings)[item.name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise SettingsError(f"settings file not found: {path} ({CONFIG_FILE_ENV})") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read settings file {path}: {exc}") from exc
    fields = {item.name: item for item in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise SettingsError(
            f"unknown setting {unknown[0]!r} in {path}; known settings: {', '.join(fields)}"
        )
    return {
        name: _coerce(name, value, _field_type(fields[name]), path) for name, value in raw.items()
    }


def _coerce(name: str, value: Any, kind: type, path: Path) -> Any:
    """Check a TOML value against the field type, since TOML values arrive typed."""
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }[kind]
    if not ok:
        raise SettingsError(
            f"invalid value {value!r} for {name} in {path}: expected {kind.__name__}"
        )
    if kind is Path:
        return Path(value).expanduser() if value else None
    return kind(value)


def _parse(name: str, raw: str, kind: type) -> object:
    try:
        if kind is Path:
            return Path(raw).expanduser() if raw else None
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        raise SettingsError(f"invalid value {raw!r} for {name}: expected {kind.__name__}") from exc
    return raw
