"""Batch processing of impressions and returns: decode, apply, emit samples, store states.

The agents take events in batches (Faust's ``Stream.take_events``) and hand each batch to
:func:`process_batch`, which runs in three steps:

1. Plan, without side effects: decode and check every record, then apply it to the user's state.
   A user with several events in the batch is read from the table once and updated in memory.
   Records that fail go to the plan's dead letters.
2. Send the plan's samples and wait until the broker has acknowledged them.
3. Store each changed user's state once: the local RocksDB and one changelog record.

Samples are acknowledged before the states that emitted them are stored, so a worker that dies in
between loses no sample. After a restart it reads the events again, finds states without them
and emits the same samples a second time. The trainer skips a sample of a session it already
learned (``sec_online.trainer``). Offsets are committed only
after Faust's producer has flushed the changelog, the samples and the dead letters.

Both agents change the same users, so one lock keeps their batches apart from the first read to
the last write. The wait for the samples' acknowledgement happens inside the lock.

A record that raises an unexpected error (a bug, not a rejected record) makes the whole plan
void; the batch is then planned again one record at a time, so only that record is
dead-lettered, as before batching.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from faust.streams import _current_event

from sec_online.schemas import InvalidRecord, Sample, decode_impression, decode_return
from sec_online.userstate import APPLIED, Outcome, StateConflict

if TYPE_CHECKING:
    from streams.app import Worker

logger = logging.getLogger(__name__)

IMPRESSIONS = "impressions"
RETURNS = "returns"
# Original bytes kept whole in a dead letter; a longer record keeps this prefix, its size and
# its SHA-256. The dead-letter topic accepts records of DEAD_LETTER_MAX_BYTES.
DEAD_LETTER_KEEP_BYTES = 1_048_576
DEAD_LETTER_MAX_BYTES = 8 * 1_048_576
# Record the users-per-level timeline every this many applied returns.
TIMELINE_EVERY_RETURNS = 200


@dataclass
class UserChange:
    """The state of one user changed by a batch, and what the metrics need to know about it."""

    event: Any
    state: dict[str, Any]
    new_user: bool
    old_level: int | None


@dataclass
class Rejected:
    """A record of the batch that goes to the dead-letter topic."""

    event: Any
    reason: str
    message: str


@dataclass
class Plan:
    """Samples, state changes and dead letters of one batch, computed before any is sent."""

    changes: dict[bytes, UserChange] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    applied: int = 0
    duplicates: int = 0
    newest_event_ms: int = 0


def as_current(event: Any) -> None:
    """Make ``event`` the current event of this task, as Faust's stream does for one event.

    Faust's table and RocksDB store take the partition of a key from the current event, so a
    batch that spans partitions must name each event before reading or writing its user.
    """
    _current_event.set(weakref.ref(event))


def plan_batch(worker: Worker, kind: str, events: Sequence[Any]) -> Plan:
    """Decode and apply ``events`` in memory, without sending or storing anything."""
    plan = Plan()
    if kind == IMPRESSIONS:
        decode: Callable[[bytes], Any] = decode_impression
        apply = worker.machine.apply_impression
    else:
        decode = decode_return
        # One batch rates its returns with the boundaries in force when it starts.
        boundaries, version = worker.policy.boundaries()

        def apply(state: dict[str, Any] | None, record: Any) -> Outcome:
            return worker.machine.apply_return(state, record, boundaries, version)

    for event in events:
        try:
            record = decode(event.message.value)
            _check_key(event, record.user_id)
            key = event.message.key
            change = plan.changes.get(key)
            if change is None:
                as_current(event)
                previous = worker.users.get(key)
                new_user = previous is None
                # The machine updates the state in place: read the level before applying.
                old_level = None if previous is None else previous["level"]
            else:
                previous = change.state
            outcome = apply(previous, record)
        except (InvalidRecord, StateConflict) as exc:
            plan.rejected.append(Rejected(event, exc.reason, exc.message))
            continue
        if change is None:
            plan.changes[key] = UserChange(event, outcome.state, new_user, old_level)
        else:
            change.event, change.state = event, outcome.state
        plan.samples.extend(outcome.samples)
        if outcome.status == APPLIED:
            plan.applied += 1
        else:
            plan.duplicates += 1
        plan.newest_event_ms = max(plan.newest_event_ms, record.time_ms)
    return plan


def _check_key(event: Any, user_id: int) -> None:
    expected = str(user_id).encode()
    if event.message.key != expected:
        raise InvalidRecord(
            "wrong_key", f"record key {event.message.key!r} does not match user_id {user_id}"
        )


async def process_batch(worker: Worker, kind: str, events: Sequence[Any]) -> None:
    """Apply a batch of records of one topic, in the steps that the module docstring lists."""
    worker.metrics.consumed[kind] += len(events)
    async with worker.batch_lock:
        try:
            plan = plan_batch(worker, kind, events)
        except Exception:  # noqa: BLE001 - planned again one record at a time
            logger.exception(
                "planning a batch of %d %s records failed; applying them one at a time",
                len(events),
                kind,
            )
            await _process_singly(worker, kind, events)
            return
        await _commit_or_reject(worker, kind, plan, events)


async def _commit_or_reject(worker: Worker, kind: str, plan: Plan, events: Sequence[Any]) -> None:
    try:
        await _commit(worker, kind, plan)
    except Exception as exc:  # noqa: BLE001 - every record is kept on the dead-letter topic
        await _reject_batch(worker, kind, events, exc)


async def _reject_batch(worker: Worker, kind: str, events: Sequence[Any], exc: Exception) -> None:
    """Dead-letter every record of a batch whose samples or states failed to go out.

    An agent that raised here would stop taking records for good, so the batch is kept whole
    on the dead-letter topic instead. Some of its records may have been applied before the
    error: published again, those count as duplicates.
    """
    logger.exception(
        "storing a batch of %d %s records failed; dead-lettering all of them", len(events), kind
    )
    message = (
        f"batch failed after planning, some records may be applied: {type(exc).__name__}: {exc}"
    )
    for event in events:
        await dead_letter(worker, event, "processing_error", message)


async def _process_singly(worker: Worker, kind: str, events: Sequence[Any]) -> None:
    for event in events:
        try:
            plan = plan_batch(worker, kind, [event])
        except Exception as exc:  # noqa: BLE001 - the record is kept on the dead-letter topic
            logger.exception(
                "failed to process record topic=%s partition=%s offset=%s",
                event.message.topic,
                event.message.partition,
                event.message.offset,
            )
            await dead_letter(worker, event, "processing_error", f"{type(exc).__name__}: {exc}")
            continue
        # Committed before the next record is planned, which reads the state stored here.
        await _commit_or_reject(worker, kind, plan, [event])


async def _commit(worker: Worker, kind: str, plan: Plan) -> None:
    await _send_samples(worker, plan.samples)
    _store(worker, kind, plan)
    for rejected in plan.rejected:
        await dead_letter(worker, rejected.event, rejected.reason, rejected.message)


async def dead_letter(worker: Worker, event: Any, reason: str, message: str) -> None:
    """Send a record that could not be applied to the dead-letter topic, and count it."""
    meta = event.message
    value = meta.value or b""
    record = {
        "reason": reason,
        "message": message,
        "topic": meta.topic,
        "partition": meta.partition,
        "offset": meta.offset,
        "key_b64": base64.b64encode(meta.key or b"").decode(),
        "value_b64": base64.b64encode(value[:DEAD_LETTER_KEEP_BYTES]).decode(),
        "value_bytes": len(value),
        "value_sha256": hashlib.sha256(value).hexdigest(),
        "value_truncated": len(value) > DEAD_LETTER_KEEP_BYTES,
        "dead_lettered_ms": int(time.time() * 1000),
    }
    worker.metrics.dead_letters[reason] += 1
    logger.warning(
        "dead-lettered record topic=%s partition=%s offset=%s reason=%s: %s",
        meta.topic,
        meta.partition,
        meta.offset,
        reason,
        message,
    )
    await worker.dead_letters_topic.send(key=meta.key, value=json.dumps(record).encode())


async def _send_samples(worker: Worker, samples: list[Sample]) -> None:
    if samples:
        await worker.sample_producer.send(samples)
        worker.metrics.samples_emitted += len(samples)


def _store(worker: Worker, kind: str, plan: Plan) -> None:
    metrics = worker.metrics
    for key, change in plan.changes.items():
        as_current(change.event)
        worker.users[key] = change.state
        # The dashboard shows which expert the selector picks for these recently active users.
        metrics.touch_user(key)
        if change.new_user:
            metrics.add_user(change.state["level"])
        else:
            metrics.move_user(change.old_level, change.state["level"])
    before = metrics.applied[kind]
    # Counters list only the kinds that occurred, as the pages and the metrics expect.
    if plan.applied:
        metrics.applied[kind] += plan.applied
    if plan.duplicates:
        metrics.duplicates[kind] += plan.duplicates
    if plan.applied or plan.duplicates:
        metrics.last_event_ms = max(metrics.last_event_ms, plan.newest_event_ms)
    crossed = metrics.applied[kind] // TIMELINE_EVERY_RETURNS > before // TIMELINE_EVERY_RETURNS
    if kind == RETURNS and crossed:
        metrics.record_levels(plan.newest_event_ms)
