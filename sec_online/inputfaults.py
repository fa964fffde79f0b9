"""Invalid and repeated records mixed with valid ones of the real log, sent through a worker.

A mix takes the events of a log slice, gives its users ids of their own (``shift_users``), and
inserts invalid records of the kinds in ``BAD_KINDS`` and exact copies of valid records at
planned positions (``MixPlan``). After the worker consumed the mix, ``check_mix`` compares:

- the users' states dumped from the changelog with the pandas reference of the valid events,
- the dead letters of the mix's keys with the invalid records sent: the same reasons, the same
  count and the same original bytes,
- the duplicates counted in the states and on ``/stats/`` with the copies sent,
- the ``/stats/`` dead-letter counters with the reasons expected.

Because each mix has its own user ids, one worker and one topic set serve any number of mixes,
which is how ``tests/test_bad_input.py`` runs a property test without a worker per example.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sec_online import topics
from sec_online.kafka_admin import read_all
from sec_online.reliability import (
    LogSlice,
    Record,
    ScenarioResult,
    as_records,
    publish,
    reset_scenario,
    scenario_settings,
    score_states,
    start_worker,
    wait_caught_up,
)
from sec_online.schemas import MAX_EVENT_ID_CHARS, MAX_RECORD_BYTES, MAX_TIME_MS, encode_key
from sec_online.settings import Settings
from sec_online.statedump import dump_states
from sec_online.workerproc import WorkerProcess

logger = logging.getLogger(__name__)

SCENARIO = "bad_input_mix"
# The n-th offset of a runner is ``n * USER_ID_STRIDE``. KuaiRand user ids are below 30,000, so
# shifted users never collide, and ids stay far below 2**63 for millions of mixes.
USER_ID_STRIDE = 10**9
# Invalid records and copies of a seeded mix of ``run_bad_input_mix``.
MIX_BAD_RECORDS = 12
MIX_COPIES = 10


@dataclass(frozen=True)
class BadKind:
    """One kind of invalid record, derived from a valid event of ``topic``.

    ``make`` turns the valid event's JSON payload and a unique tag into the record's value, and
    ``reason`` is the dead-letter reason the worker must give it. ``rekey`` changes the Kafka key.
    """

    topic: str
    reason: str
    make: Callable[[dict[str, Any], str], bytes]
    rekey: Callable[[bytes], bytes] | None = None


def _compact(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _tagged(payload: dict[str, Any], tag: str, **changes: Any) -> bytes:
    # A new event id keeps every invalid record's bytes distinct from the others of its mix.
    return _compact({**payload, "event_id": f"bad:{tag}", **changes})


def _without(payload: dict[str, Any], tag: str, name: str) -> bytes:
    record = {key: value for key, value in payload.items() if key != name}
    return _compact({**record, "event_id": f"bad:{tag}"})


def _huge_record(payload: dict[str, Any], tag: str) -> bytes:
    # Just over the schema's limit and below Kafka's default 1 MiB message size, so the broker
    # accepts it and the worker is the one that rejects it.
    padding = "x" * (MAX_RECORD_BYTES + 100 - len(_tagged(payload, tag)))
    return _tagged(payload, tag, padding=padding)


def _far_ahead(payload: dict[str, Any], tag: str) -> bytes:
    # Valid for the schema, but more than MAX_AHEAD_MS after every event of the real log.
    return _tagged(payload, tag, time_ms=MAX_TIME_MS, session_id=MAX_TIME_MS)


def _inconsistent_gap(payload: dict[str, Any], tag: str) -> bytes:
    previous = payload["session_id"] - 1
    return _tagged(payload, tag, previous_session_id=previous, gap_ms=10)


BAD_KINDS: dict[str, BadKind] = {
    "undecodable": BadKind(
        topics.IMPRESSIONS, "undecodable", lambda p, tag: b"\xff\xfe{" + tag.encode()
    ),
    "json_array": BadKind(topics.IMPRESSIONS, "not_object", lambda p, tag: _compact([p, tag])),
    "json_string": BadKind(topics.RETURNS, "not_object", lambda p, tag: _compact(tag)),
    "missing_field": BadKind(
        topics.IMPRESSIONS, "missing_field", lambda p, tag: _without(p, tag, "tab")
    ),
    "extra_field": BadKind(
        topics.RETURNS, "unexpected_field", lambda p, tag: _tagged(p, tag, region="north")
    ),
    "string_id": BadKind(
        topics.IMPRESSIONS, "wrong_type", lambda p, tag: _tagged(p, tag, video_id="12")
    ),
    "float_count": BadKind(
        topics.RETURNS,
        "wrong_type",
        lambda p, tag: _tagged(p, tag, previous_session_impressions=1.5),
    ),
    "huge_watch_time": BadKind(
        topics.IMPRESSIONS, "wrong_type", lambda p, tag: _tagged(p, tag, play_time_ms=1e308)
    ),
    "id_over_int64": BadKind(
        topics.IMPRESSIONS, "out_of_range", lambda p, tag: _tagged(p, tag, video_id=2**63)
    ),
    "negative_time": BadKind(
        topics.IMPRESSIONS, "out_of_range", lambda p, tag: _tagged(p, tag, time_ms=-p["time_ms"])
    ),
    "after_2100": BadKind(
        topics.RETURNS,
        "out_of_range",
        lambda p, tag: _tagged(p, tag, time_ms=MAX_TIME_MS + 1, session_id=MAX_TIME_MS + 1),
    ),
    "inconsistent_gap": BadKind(topics.RETURNS, "out_of_range", _inconsistent_gap),
    "unknown_version": BadKind(
        topics.IMPRESSIONS, "unknown_schema", lambda p, tag: _tagged(p, tag, schema="impression/2")
    ),
    "long_event_id": BadKind(
        topics.IMPRESSIONS,
        "too_large",
        lambda p, tag: _tagged(p, tag, event_id=f"bad:{tag}:" + "y" * MAX_EVENT_ID_CHARS),
    ),
    "huge_record": BadKind(topics.IMPRESSIONS, "too_large", _huge_record),
    "wrong_key": BadKind(
        topics.RETURNS, "wrong_key", lambda p, tag: _tagged(p, tag), rekey=lambda key: key + b"0"
    ),
    "far_ahead_of_user": BadKind(topics.IMPRESSIONS, "too_far_ahead", _far_ahead),
}


@dataclass(frozen=True)
class MixPlan:
    """Placement of a mix's invalid records and copies among the valid events.

    ``bad`` contains ``(kind, position)`` pairs and ``copies`` contains ``(position, delay)``
    pairs. A position in ``[0, 1)`` is a share of the valid events. An invalid record follows
    the first valid event of its kind's topic at or after its position, and a copy repeats the
    valid event at its position after ``delay`` more valid events.
    """

    bad: tuple[tuple[str, float], ...] = ()
    copies: tuple[tuple[float, int], ...] = ()


@dataclass(frozen=True)
class SentBadRecord:
    """An invalid record of a mix and the dead-letter reason it must get."""

    kind: str
    reason: str
    record: Record


@dataclass
class Mix:
    """Records of one mix in publish order, and what the worker must make of them."""

    log_slice: LogSlice
    records: list[Record]
    bad: list[SentBadRecord]
    copies: int
    keys: set[bytes] = field(default_factory=set)


def random_plan(rng: random.Random, bad_records: int, copies: int) -> MixPlan:
    """Draw a plan with ``bad_records`` invalid records of random kinds and ``copies`` copies."""
    kinds = sorted(BAD_KINDS)
    bad = tuple((rng.choice(kinds), rng.random()) for _ in range(bad_records))
    repeated = tuple((rng.random(), rng.randrange(0, 40)) for _ in range(copies))
    return MixPlan(bad=bad, copies=repeated)


def shift_users(log_slice: LogSlice, offset: int) -> LogSlice:
    """Add ``offset`` to every user id of a slice's events and reference states.

    Event ids that start with ``"<user_id>:"`` or ``"return:<user_id>:"`` get the new id too.
    """
    events = [
        (kind, encode_key(int(key) + offset), _shift_value(value, offset))
        for kind, key, value in log_slice.events
    ]
    expected = {user + offset: state for user, state in log_slice.expected.items()}
    return LogSlice([user + offset for user in log_slice.user_ids], events, expected)


def _shift_value(value: bytes, offset: int) -> bytes:
    payload = json.loads(value)
    old, new = str(payload["user_id"]), str(payload["user_id"] + offset)
    payload["user_id"] += offset
    event_id = payload["event_id"]
    for prefix in ("", "return:"):
        if event_id.startswith(f"{prefix}{old}:"):
            payload["event_id"] = f"{prefix}{new}:" + event_id[len(prefix) + len(old) + 1 :]
    return _compact(payload)


def subset(log_slice: LogSlice, user_ids: Sequence[int]) -> LogSlice:
    """Keep the events and reference states of ``user_ids`` only."""
    keys = {encode_key(user) for user in user_ids}
    events = [event for event in log_slice.events if event[1] in keys]
    expected = {user: log_slice.expected[user] for user in user_ids}
    return LogSlice(list(user_ids), events, expected)


def build_mix(settings: Settings, log_slice: LogSlice, plan: MixPlan, tag: str) -> Mix:
    """Insert the plan's invalid records and copies among the slice's valid events.

    ``tag`` makes the invalid records' bytes unique across mixes.
    """
    valid = as_records(settings, log_slice.events)
    after: dict[int, list[Record]] = {}
    bad: list[SentBadRecord] = []
    for number, (kind_name, position) in enumerate(plan.bad):
        index, record = _bad_record(settings, valid, kind_name, position, f"{tag}-{number}")
        after.setdefault(index, []).append(record.record)
        bad.append(record)
    for position, delay in plan.copies:
        index = _index(len(valid), position)
        after.setdefault(min(len(valid) - 1, index + delay), []).append(valid[index])
    records: list[Record] = []
    for index, record in enumerate(valid):
        records.append(record)
        records.extend(after.get(index, []))
    keys = {record.key for record in records}
    return Mix(log_slice, records, bad, copies=len(plan.copies), keys=keys)


def _index(count: int, position: float) -> int:
    return min(count - 1, int(position * count))


def _bad_record(
    settings: Settings, valid: list[Record], kind_name: str, position: float, tag: str
) -> tuple[int, SentBadRecord]:
    kind = BAD_KINDS[kind_name]
    topic = settings.topic(kind.topic)
    start = _index(len(valid), position)
    candidates = [i for i in range(start, len(valid)) if valid[i].topic == topic]
    if not candidates:
        candidates = [i for i in range(len(valid)) if valid[i].topic == topic][-1:]
    if not candidates:
        raise ValueError(f"the slice has no event on {topic} to derive a {kind_name} record from")
    index = candidates[0]
    template = valid[index]
    key = kind.rekey(template.key) if kind.rekey else template.key
    value = kind.make(json.loads(template.value), tag)
    return index, SentBadRecord(kind_name, kind.reason, Record(topic, key, value))


# Checking a mix.
@dataclass(frozen=True)
class DeadLetter:
    """A dead letter read back: its reason, key and the original bytes it carries."""

    reason: str
    key: bytes
    value: bytes
    truncated: bool


def read_dead_letters(settings: Settings) -> list[DeadLetter]:
    """Read every dead letter on the settings' dead-letter topic, in offset order."""
    letters = []
    for record in read_all(settings.bootstrap, settings.topic(topics.DEAD_LETTERS)):
        body = json.loads(record.value)
        letters.append(
            DeadLetter(
                reason=body["reason"],
                key=base64.b64decode(body["key_b64"]),
                value=base64.b64decode(body["value_b64"]),
                truncated=bool(body["value_truncated"]),
            )
        )
    return letters


def stats_counts(worker: WorkerProcess) -> Counter[str]:
    """Dead letters by reason and duplicates from ``/stats/``, as one counter.

    Duplicates are under ``"duplicates"`` and each dead-letter reason under ``"dead:<reason>"``.
    """
    # A generous timeout: the worker may be busy with a large batch on a loaded machine.
    stats = worker.get("/stats/", timeout_s=60.0)
    counts: Counter[str] = Counter()
    counts["duplicates"] = sum(stats["duplicates"].values())
    for reason, count in stats["dead_letters"].items():
        counts[f"dead:{reason}"] = count
    return counts


def expected_stats_delta(mixes: Sequence[Mix]) -> Counter[str]:
    """How far the ``stats_counts`` counters must move while the worker consumes ``mixes``."""
    want: Counter[str] = Counter()
    for mix in mixes:
        want["duplicates"] += mix.copies
        want.update(f"dead:{bad.reason}" for bad in mix.bad)
    return +want


def check_mix(
    settings: Settings,
    mix: Mix,
    stats_delta: Counter[str] | None = None,
    states: list[dict[str, Any]] | None = None,
    letters: list[DeadLetter] | None = None,
) -> dict[str, Any]:
    """Compare what the worker made of a mix with what it must make; see the module docstring.

    Call it after the worker committed every record of the mix (``wait_caught_up``).
    ``stats_delta`` is how far ``stats_counts`` moved while the worker consumed this mix alone,
    or ``None`` to skip that check when several mixes were consumed together. ``states`` and
    ``letters`` are the dumped states and the dead letters, read here when not given, so
    checking several mixes needs one read of each topic.
    """
    result = ScenarioResult(name=SCENARIO)
    users = set(mix.log_slice.expected)
    if states is None:
        states = dump_states(settings)
    if letters is None:
        letters = read_dead_letters(settings)
    states = [state for state in states if int(state["user_id"]) in users]
    score_states(result, states, mix.log_slice.expected)
    letters = [letter for letter in letters if letter.key in mix.keys]
    got = Counter((letter.reason, letter.value) for letter in letters)
    want = Counter((bad.reason, bad.record.value) for bad in mix.bad)
    details = {
        "valid_events": len(mix.log_slice.events),
        "expected_applied": result.expected,
        "mismatching_users": result.mismatching_users,
        "duplicates_published": mix.copies,
        "duplicates_detected": result.duplicates_detected,
        "dead_letter_reasons": dict(sorted(Counter(letter.reason for letter in letters).items())),
        "expected_dead_letter_reasons": dict(sorted(Counter(b.reason for b in mix.bad).items())),
        "dead_letters_not_sent": _describe(got - want),
        "bad_records_not_dead_lettered": _describe(want - got),
        "truncated_dead_letters": sum(letter.truncated for letter in letters),
    }
    if stats_delta is not None:
        details["stats_delta"] = dict(sorted(stats_delta.items()))
        details["expected_stats_delta"] = dict(sorted(expected_stats_delta([mix]).items()))
    details["failures"] = _failures(result, details)
    details["passed"] = not details["failures"]
    return {
        "published": len(mix.records),
        "applied": result.applied,
        "lost": result.lost,
        "applied_twice": result.applied_twice,
        "dead_lettered": len(letters),
        "recovery_seconds": None,
        "details": details,
    }


def _describe(pairs: Counter[tuple[str, bytes]]) -> list[str]:
    return [f"{reason}: {value[:80]!r} ({len(value)} bytes)" for reason, value in pairs.elements()]


def _failures(result: ScenarioResult, details: dict[str, Any]) -> list[str]:
    failures = []
    if result.lost or result.applied_twice:
        failures.append(f"{result.lost} events lost, {result.applied_twice} applied twice")
    if result.mismatching_users:
        failures.append(f"users differ from the reference: {result.mismatching_users}")
    if details["duplicates_detected"] != details["duplicates_published"]:
        failures.append(
            f"{details['duplicates_detected']} duplicates counted in the states, "
            f"{details['duplicates_published']} copies sent"
        )
    for name in ("dead_letters_not_sent", "bad_records_not_dead_lettered"):
        if details[name]:
            failures.append(f"{name}: {details[name]}")
    if details.get("stats_delta") != details.get("expected_stats_delta"):
        failures.append(
            f"/stats/ counters moved by {details['stats_delta']}, expected "
            f"{details['expected_stats_delta']}"
        )
    return failures


# Running mixes.
class MixRunner:
    """One running worker on a scenario's topics that consumes mix after mix.

    ``next_offset`` gives each mix user ids that no earlier mix of this runner used.
    """

    def __init__(self, settings: Settings, worker: WorkerProcess, timeout_s: float) -> None:
        self.settings = settings
        self.worker = worker
        self.timeout_s = timeout_s
        self.offsets = 0

    def next_offset(self) -> int:
        """Return a user-id offset that this runner has not given out before."""
        self.offsets += 1
        return self.offsets * USER_ID_STRIDE

    def consume(self, mixes: Sequence[Mix]) -> Counter[str]:
        """Publish the mixes' records, wait until the worker committed them.

        Returns how far the ``stats_counts`` counters moved meanwhile.
        """
        before = stats_counts(self.worker)
        publish(self.settings, [record for mix in mixes for record in mix.records])
        wait_caught_up(self.settings, self.worker, self.timeout_s)
        return stats_counts(self.worker) - before

    def run(self, log_slice: LogSlice, plan: MixPlan) -> dict[str, Any]:
        """Publish one mix of ``log_slice`` and ``plan`` under fresh user ids and check it."""
        offset = self.next_offset()
        mix = build_mix(self.settings, shift_users(log_slice, offset), plan, tag=f"o{offset}")
        delta = self.consume([mix])
        outcome = check_mix(self.settings, mix, delta)
        outcome["details"]["user_id_offset"] = offset
        return outcome


@contextmanager
def mix_runner(base: Settings, prefix: str, web_port: int, timeout_s: float) -> Iterator[MixRunner]:
    """Start a worker on fresh topics of the ``bad_input_mix`` scenario; stop it on exit."""
    settings = scenario_settings(base, prefix, SCENARIO, web_port)
    reset_scenario(settings, base.work_dir / "clusters")
    worker, seconds = start_worker(settings, "worker.log")
    logger.info("bad-input worker ready web_port=%d after %.1f s", web_port, seconds)
    try:
        yield MixRunner(settings, worker, timeout_s)
    finally:
        worker.stop()


def run_bad_input_mix(
    settings: Settings,
    log_slice: LogSlice,
    prefix: str,
    seed: int,
    web_port: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Send one seeded mix of valid, invalid and repeated records through a fresh worker.

    The result has ``published`` (every record sent), ``applied`` (impressions and returns in
    the dumped states), ``lost``, ``applied_twice`` and ``dead_lettered`` (dead letters of the
    mix). ``recovery_seconds`` is always ``None``, because nothing restarts. ``details`` lists
    every broken expectation in ``failures``, and ``passed`` is true when there is none.
    """
    plan = random_plan(random.Random(f"{seed}-{SCENARIO}"), MIX_BAD_RECORDS, MIX_COPIES)
    with mix_runner(settings, prefix, web_port, timeout_s) as runner:
        outcome = runner.run(log_slice, plan)
    outcome["details"]["plan"] = {"bad": list(plan.bad), "copies": list(plan.copies)}
    logger.info("bad-input mix finished %s", json.dumps(outcome["details"], default=str))
    return outcome
