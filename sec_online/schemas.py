"""Event schemas of the Kafka topics, with validation.

Every record is a UTF-8 JSON object whose ``schema`` field names the record type and its
version, for example ``"impression/1"``. Records on user-keyed topics carry the user id as their
key (decimal text). ``decode_*`` raise ``InvalidRecord`` with a short machine-readable reason and a
message; the worker sends such records to the dead-letter topic.

Validation rules, checked on each record alone:

- A record is at most ``MAX_RECORD_BYTES`` bytes of UTF-8 JSON whose top level is an object with
  exactly the fields of its schema. An unknown ``schema`` value, including another version of a
  known type, is rejected, because a worker must not guess at a format it was not written for.
- Integer fields must be JSON integers that fit a signed 64-bit integer (``-2**63 + 1`` to
  ``2**63 - 1``). A float, even ``1e308`` or ``3.0``, a string or a boolean is ``wrong_type``.
- ``event_id`` is a non-empty string of at most ``MAX_EVENT_ID_CHARS`` characters of valid
  Unicode text (no lone surrogate escapes), because the worker keeps the ids of a session's
  impressions in the user's state.
- Times (``time_ms``, ``session_id``, ``previous_session_id``) lie in a fixed valid range, from
  2000-01-01 to 2100-01-01 UTC. The range is fixed rather than relative to the wall clock
  because a replay publishes the log's 2022 event times today. A record far ahead of the
  user's own earlier events is rejected by ``sec_online.userstate``, which knows that history.
- A return's gap is consistent with the session it closes: ``session_id - gap_ms`` (the last
  request of the previous session) is not before ``previous_session_id``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

FEEDBACK_SIGNALS = ("click", "long_view", "like", "comment", "forward", "follow", "hate")
IMPRESSION_SCHEMA = "impression/1"
RETURN_SCHEMA = "return/1"
SAMPLE_SCHEMA = "sample/1"
# Valid range of every time field, in ms since the Unix epoch: 2000-01-01 to 2100-01-01 UTC.
MIN_TIME_MS = 946_684_800_000
MAX_TIME_MS = 4_102_444_800_000
MAX_RECORD_BYTES = 1_000_000
# Integer fields must fit a signed 64-bit integer, as in Kafka, RocksDB keys and tensors.
MAX_INT = 2**63 - 1
MAX_EVENT_ID_CHARS = 128


class InvalidRecord(ValueError):
    """A record that cannot be decoded or fails validation.

    ``reason`` is a short stable code (``undecodable``, ``not_object``, ``unknown_schema``,
    ``missing_field``, ``unexpected_field``, ``wrong_type``, ``out_of_range``, ``too_large``)
    used as the dead-letter reason and as a metric label.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Impression:
    """One video shown to a user in one request, with the user's feedback on it."""

    event_id: str
    user_id: int
    video_id: int
    time_ms: int
    session_id: int
    click: int
    long_view: int
    like: int
    comment: int
    forward: int
    follow: int
    hate: int
    play_time_ms: int
    duration_ms: int
    tab: int
    schema: str = IMPRESSION_SCHEMA

    def signals(self) -> tuple[int, ...]:
        """The seven feedback signals in ``FEEDBACK_SIGNALS`` order."""
        return tuple(getattr(self, name) for name in FEEDBACK_SIGNALS)


@dataclass(frozen=True)
class Return:
    """A user starting a new session, which closes their previous one.

    ``session_id`` is the new session's start time (ms). ``previous_session_id`` and
    ``previous_session_impressions`` name the session it closes and how many impressions that
    session has, so a worker closes it only once all of them arrived, whatever the order in
    which the two topics are consumed. For a user's first session they are ``None`` and 0.
    ``gap_ms`` is the time from the last request of the previous session to this session's
    start, ``None`` when no earlier activity is known.
    """

    event_id: str
    user_id: int
    time_ms: int
    session_id: int
    previous_session_id: int | None
    previous_session_impressions: int
    gap_ms: int | None
    schema: str = RETURN_SCHEMA


@dataclass(frozen=True)
class Sample:
    """One behaviour-cloning sample: a closed session of one user.

    ``features`` is the user's state vector at the session's start, ``actions`` the session's
    video clusters as ``[cluster, weight]`` pairs, ``level`` the user's historical retention
    level when the session closed and ``gap_ms`` the return gap that closed it.
    """

    event_id: str
    user_id: int
    session_id: int
    time_ms: int
    features: list[float]
    actions: list[list[float]]
    level: int
    retention_score: float
    gap_ms: int
    schema: str = SAMPLE_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)


_INT_FIELDS = {
    IMPRESSION_SCHEMA: (
        "user_id",
        "video_id",
        "time_ms",
        "session_id",
        *FEEDBACK_SIGNALS,
        "play_time_ms",
        "duration_ms",
        "tab",
    ),
    RETURN_SCHEMA: ("user_id", "time_ms", "session_id", "previous_session_impressions"),
}
_OPTIONAL_INT_FIELDS = {IMPRESSION_SCHEMA: (), RETURN_SCHEMA: ("previous_session_id", "gap_ms")}
_TYPES = {IMPRESSION_SCHEMA: Impression, RETURN_SCHEMA: Return}
_FIELDS = {schema: frozenset(kind.__dataclass_fields__) for schema, kind in _TYPES.items()}


def encode(record: Impression | Return | Sample) -> bytes:
    """Serialise a record as compact UTF-8 JSON."""
    # A shallow dict: dataclasses.asdict deep-copies and dominates the replay's CPU time.
    payload = {name: getattr(record, name) for name in record.__dataclass_fields__}
    return orjson.dumps(payload)


def encode_key(user_id: int) -> bytes:
    """Kafka key of a user-keyed record."""
    return str(user_id).encode()


def decode_impression(raw: bytes) -> Impression:
    """Decode and validate an ``impressions`` record."""
    record = _decode_exactly(raw, IMPRESSION_SCHEMA)
    assert isinstance(record, Impression)
    return record


def decode_return(raw: bytes) -> Return:
    """Decode and validate a ``returns`` record."""
    record = _decode_exactly(raw, RETURN_SCHEMA)
    assert isinstance(record, Return)
    return record


def decode_event(raw: bytes) -> Impression | Return:
    """Decode an impression or a return, whichever the ``schema`` field names."""
    return _decode_exactly(raw, None)


def decode_sample(raw: bytes) -> Sample:
    """Decode a ``samples`` record, which only the worker itself writes."""
    payload = _load_object(raw)
    if payload.get("schema") != SAMPLE_SCHEMA:
        raise InvalidRecord("unknown_schema", f"expected {SAMPLE_SCHEMA}")
    try:
        return Sample(**payload)
    except TypeError as exc:
        raise InvalidRecord("missing_field", str(exc)) from exc


def _decode_exactly(raw: bytes, schema: str | None) -> Impression | Return:
    """Decode with orjson, and again with the standard decoder when a field has a wrong type.

    orjson reads an integer beyond 64 bits as a float. The standard decoder keeps it exact, so
    such a record is rejected as ``out_of_range``, as other too large integers are.
    """
    try:
        return _build_record(_load_object(raw), schema)
    except InvalidRecord as exc:
        if exc.reason != "wrong_type":
            raise
    return _build_record(_load_slowly(raw), schema)


def _build_record(payload: Any, schema: str | None) -> Impression | Return:
    if not isinstance(payload, dict):
        raise InvalidRecord("not_object", f"expected a JSON object, got {type(payload).__name__}")
    found = payload.get("schema")
    if schema is None and found not in _TYPES:
        raise InvalidRecord("unknown_schema", f"schema {found!r} is not one of {sorted(_TYPES)}")
    if schema is not None and found != schema:
        raise InvalidRecord("unknown_schema", f"schema {found!r}, expected {schema!r}")
    return _build(payload, found)


def _load_object(raw: bytes) -> dict[str, Any]:
    if raw is None:
        raise InvalidRecord("undecodable", "record has no value")
    if not raw:
        raise InvalidRecord("undecodable", "record value is empty")
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord("too_large", f"{len(raw)} bytes, limit {MAX_RECORD_BYTES}")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is several times faster but rejects NaN, integers beyond 64 bits and deep
        # nesting. The standard decoder gives such records the same reasons as before.
        payload = _load_slowly(raw)
    if not isinstance(payload, dict):
        raise InvalidRecord("not_object", f"expected a JSON object, got {type(payload).__name__}")
    return payload


def _load_slowly(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRecord("undecodable", f"not UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRecord("undecodable", "JSON nested too deeply to decode") from exc


def _build(payload: dict[str, Any], schema: str) -> Impression | Return:
    kind = _TYPES[schema]
    expected = _FIELDS[schema]
    if payload.keys() != expected:
        _check_field_names(payload, schema, expected)
    _check_event_id(payload["event_id"])
    for name in _INT_FIELDS[schema]:
        _check_int(name, payload[name])
    for name in _OPTIONAL_INT_FIELDS[schema]:
        if payload[name] is not None:
            _check_int(name, payload[name])
    _check_ranges(payload, schema)
    return kind(**payload)


def _check_field_names(payload: dict[str, Any], schema: str, expected: frozenset[str]) -> None:
    missing = sorted(expected - payload.keys())
    if missing:
        raise InvalidRecord("missing_field", f"{schema} lacks {', '.join(missing)}")
    unexpected = sorted(payload.keys() - expected)
    if unexpected:
        raise InvalidRecord("unexpected_field", f"{schema} has unknown {', '.join(unexpected)}")


def _check_event_id(value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidRecord("wrong_type", "event_id must be a non-empty string")
    if len(value) > MAX_EVENT_ID_CHARS:
        raise InvalidRecord(
            "too_large", f"event_id has {len(value)} characters, limit {MAX_EVENT_ID_CHARS}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON allows an escaped lone surrogate such as "\ud800", but it is not text, and the
        # user's state, which keeps the id, could not be written as UTF-8 JSON.
        raise InvalidRecord(
            "undecodable", f"event_id {value!r} is not valid Unicode text: {exc.reason}"
        ) from exc


def _check_int(name: str, value: Any) -> None:
    # bool is an int subclass in Python, but true/false in JSON is a schema error here.
    if isinstance(value, bool) or not isinstance(value, int):
        # Messages spell the value as JSON (true, null), as the producer wrote it.
        text = json.dumps(value)
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            raise InvalidRecord("wrong_type", f"{name}={text} must be an integer literal")
        raise InvalidRecord("wrong_type", f"{name}={text} must be an integer")
    if not -MAX_INT <= value <= MAX_INT:
        raise InvalidRecord("out_of_range", f"{name}={value} does not fit a 64-bit integer")


def _check_ranges(payload: dict[str, Any], schema: str) -> None:
    for name in ("time_ms", "session_id"):
        if not MIN_TIME_MS <= payload[name] <= MAX_TIME_MS:
            raise InvalidRecord(
                "out_of_range",
                f"{name}={payload[name]} is outside the valid range {MIN_TIME_MS} to "
                f"{MAX_TIME_MS} (2000-01-01 to 2100-01-01 UTC, in ms)",
            )
    if payload["user_id"] < 0:
        raise InvalidRecord("out_of_range", f"user_id={payload['user_id']} is negative")
    if schema == IMPRESSION_SCHEMA:
        for name in FEEDBACK_SIGNALS:
            if payload[name] not in (0, 1):
                raise InvalidRecord("out_of_range", f"{name}={payload[name]} must be 0 or 1")
        for name in ("video_id", "play_time_ms", "duration_ms", "tab"):
            if payload[name] < 0:
                raise InvalidRecord("out_of_range", f"{name}={payload[name]} is negative")
        if payload["session_id"] > payload["time_ms"]:
            raise InvalidRecord("out_of_range", "session_id is later than the request time")
    else:
        if payload["previous_session_impressions"] < 0:
            raise InvalidRecord("out_of_range", "previous_session_impressions is negative")
        if payload["gap_ms"] is not None and payload["gap_ms"] < 0:
            raise InvalidRecord("out_of_range", f"gap_ms={payload['gap_ms']} is negative")
        _check_previous_session(payload)


def _check_previous_session(payload: dict[str, Any]) -> None:
    previous = payload["previous_session_id"]
    if previous is None:
        return
    if not MIN_TIME_MS <= previous <= MAX_TIME_MS:
        raise InvalidRecord("out_of_range", f"previous_session_id={previous} is not a valid time")
    if previous >= payload["session_id"]:
        raise InvalidRecord("out_of_range", "previous_session_id is not before session_id")
    gap_ms = payload["gap_ms"]
    if gap_ms is None:
        raise InvalidRecord("missing_field", "gap_ms is null but previous_session_id is set")
    if payload["session_id"] - gap_ms < previous:
        raise InvalidRecord(
            "out_of_range",
            f"gap_ms={gap_ms} puts the previous session's last request before its start "
            f"previous_session_id={previous}",
        )
