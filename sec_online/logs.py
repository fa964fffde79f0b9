"""Log set-up shared by the command line and the worker: text or JSON lines, with ids.

Every record carries its level, its component (the logger name, such as
``streams.app``) and, in a worker, the worker's id (``<app id>@<host>:<web port>``). Ids that a
call passes with ``extra=`` (topic, partition, offset, user_id, reason, version, ...) are printed
as ``key=value`` after a text message and as fields of a JSON line. JSON lines suit log shippers;
text suits a terminal.
"""

from __future__ import annotations

import json
import logging
import logging.config
import time
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes that every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def record_ids(record: logging.LogRecord) -> dict[str, Any]:
    """Return the ids a log call attached with ``extra=``, in the order they were given."""
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRIBUTES and not key.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """Human-readable lines: time, level, component, message, then ``key=value`` ids."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = record_ids(record)
        if not ids:
            return text
        head, newline, rest = text.partition("\n")
        pairs = " ".join(f"{key}={value}" for key, value in ids.items())
        return f"{head} [{pairs}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, component, message, ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "component": record.name,
            "message": record.getMessage(),
        }
        line.update(record_ids(record))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class StaticIds(logging.Filter):
    """Attach the same ids, such as the worker id, to every record that passes a handler."""

    def __init__(self, ids: dict[str, str]) -> None:
        super().__init__()
        self.ids = dict(ids)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.ids.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def logging_config(level: str, log_format: str, ids: dict[str, str] | None = None) -> dict:
    """Build a ``logging.config.dictConfig`` dict: one stderr handler in the chosen format.

    The worker hands the same dict to Faust, which applies it instead of its coloured default.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"invalid log format {log_format!r}: expected one of {LOG_FORMATS}")
    formatter = TextFormatter if log_format == "text" else JsonFormatter
    handler: dict[str, Any] = {
        "class": "logging.StreamHandler",
        "formatter": "main",
        "stream": "ext://sys.stderr",
    }
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": {"()": formatter}},
        "handlers": {"main": handler},
        "root": {"level": level, "handlers": ["main"]},
        "loggers": {
            # kafka-python logs every connection at INFO; its warnings and errors remain.
            "kafka": {"level": max(logging.WARNING, logging.getLevelName(level))},
            # Its selector warns about every callback over 100 ms, which a busy machine hits.
            "kafka.net.selector": {"level": "ERROR"},
        },
    }
    if ids:
        config["filters"] = {"ids": {"()": StaticIds, "ids": ids}}
        handler["filters"] = ["ids"]
    return config


def setup_logging(level: str, log_format: str, ids: dict[str, str] | None = None) -> None:
    """Apply ``logging_config`` to this process (command line entry points only)."""
    logging.config.dictConfig(logging_config(level, log_format, ids))


def _iso_utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
