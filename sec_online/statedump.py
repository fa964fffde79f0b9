"""Dump every user's state from the users table's changelog topic, as JSON lines.

Each worker keeps its part of the users table in a local RocksDB store, and rebuilds that store
from the changelog topic ``<app id>-<topic prefix>users-changelog`` when it starts without one.
The changelog therefore contains the whole table: the last record of each key is the user's current
state, and a record without a value (a tombstone) deletes the key. Reading the changelog instead
of the stores works while workers run, needs no access to their folders, and gives the same
result for any number of workers. A state is in the dump once the worker's producer has sent
its changelog record, which Faust does shortly after the event is applied.

Each line of a dump is one user's state dict plus ``policy_version``, the newest version on the
policy-updates topic (0 when there is none), ordered by user id.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from sec_online import topics
from sec_online.kafka_admin import read_all
from sec_online.policy import InvalidPolicyUpdate, decode_update
from sec_online.runtime import changelog_topic
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 120.0


class StateDumpError(RuntimeError):
    """A changelog record that is not a user state of this product."""


def last_values(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[bytes, bytes]:
    """Apply compaction semantics to ``(key, value)`` pairs read in offset order.

    The last value of each key wins, and a ``None`` value (a tombstone) removes the key.
    Records without a key cannot be compacted and are skipped.
    """
    latest: dict[bytes, bytes] = {}
    for key, value in records:
        if key is None:
            continue
        if value is None:
            latest.pop(key, None)
        else:
            latest[key] = value
    return latest


def decode_states(latest: dict[bytes, bytes], topic: str = "") -> list[dict[str, Any]]:
    """Decode the JSON state of each key and return the states ordered by user id.

    Raises
    ------
    StateDumpError
        When a key is not a decimal user id or a value is not a JSON object.
    """
    states = []
    for key, value in latest.items():
        user_id = _user_id(key, topic)
        try:
            state = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateDumpError(
                f"changelog {topic} contains an invalid JSON value for key {key!r}: {exc}"
            ) from exc
        if not isinstance(state, dict):
            raise StateDumpError(
                f"changelog {topic} contains a {type(state).__name__} for key {key!r}, "
                "expected a user state object"
            )
        states.append((user_id, state))
    states.sort(key=lambda pair: pair[0])
    return [state for _, state in states]


def _user_id(key: bytes, topic: str) -> int:
    text = key.decode("ascii", errors="replace")
    if not text.isdigit():
        raise StateDumpError(
            f"changelog {topic} has key {key!r}, expected a user id in decimal text; is "
            "SEC_APP_ID the app id of a sec-online worker?"
        )
    return int(text)


def dump_states(settings: Settings, timeout_s: float = READ_TIMEOUT_S) -> list[dict[str, Any]]:
    """Read the users table's changelog and return every user's current state.

    Records appended after the read starts are left out. The read uses no consumer group.

    Raises
    ------
    sec_online.kafka_admin.TopicNotFound
        When the changelog topic does not exist: no worker of ``settings.app_id`` ever started.
    """
    topic = changelog_topic(settings)
    records = read_all(settings.bootstrap, topic, timeout_s=timeout_s)
    latest = last_values((record.key, record.value) for record in records)
    states = decode_states(latest, topic)
    logger.info("read changelog topic=%s records=%d users=%d", topic, len(records), len(states))
    return states


def newest_policy_version(settings: Settings, timeout_s: float = READ_TIMEOUT_S) -> int:
    """Return the highest version on the policy-updates topic, 0 when it has no valid update.

    Updates that fail validation are skipped with a warning, as the workers skip them.
    """
    topic = settings.topic(topics.POLICY_UPDATES)
    newest = 0
    for record in read_all(settings.bootstrap, topic, timeout_s=timeout_s):
        try:
            update = decode_update(record.value)
        except InvalidPolicyUpdate as exc:
            logger.warning(
                "skipped invalid policy update topic=%s partition=%d offset=%d: %s",
                topic,
                record.partition,
                record.offset,
                exc,
            )
            continue
        newest = max(newest, update.version)
    return newest


def write_dump(
    states: Iterable[dict[str, Any]], policy_version: int, path_or_stdout: Path | str | None
) -> int:
    """Write one JSON line per state, each with ``policy_version`` added; returns the lines.

    ``path_or_stdout`` is a file path, or ``None`` or ``"-"`` for standard output. A file is
    written to a temporary name first and renamed, so readers never see half a dump.
    """
    if path_or_stdout is None or str(path_or_stdout) == "-":
        return _write_lines(states, policy_version, sys.stdout)
    path = Path(path_or_stdout)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        count = _write_lines(states, policy_version, handle)
    partial.replace(path)
    return count


def _write_lines(states: Iterable[dict[str, Any]], policy_version: int, handle: TextIO) -> int:
    count = 0
    for state in states:
        line = {**state, "policy_version": policy_version}
        handle.write(json.dumps(line, separators=(",", ":")) + "\n")
        count += 1
    return count
