"""Batch processing of the agents, in-process.

The worker's Faust table and topics are replaced by small recorders here. These tests check what
a batch does and in which order: one state write per user, samples acknowledged before any
state is stored, and a record that raises an unexpected error dead-lettered alone.
The real table and broker path is checked by tests/test_end_to_end.py and the reliability
scenarios.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from faust.streams import current_event

from sec_online.schemas import Impression, Return, Sample, encode
from sec_online.settings import Settings
from sec_online.userstate import UserStateMachine
from streams.metrics import WorkerMetrics
from streams.policy_follower import PolicyFollower
from streams.processing import IMPRESSIONS, RETURNS, plan_batch, process_batch

T0 = 1_650_812_741_436
MINUTE = 60_000
CLUSTERS = 4
# A video whose cluster lookup fails, standing in for a bug met by one record only.
BROKEN_VIDEO = 666
# A user whose state write fails, standing in for a store or changelog error.
FAILING_USER = b"61"


@dataclass
class Message:
    key: bytes
    value: bytes
    topic: str
    partition: int
    offset: int


@dataclass
class Event:
    message: Message


class Journal:
    """What the batch did, in order: sends, acknowledgements and state writes."""

    def __init__(self) -> None:
        self.entries: list[tuple[Any, ...]] = []


class RecordingTable(dict):
    """The users table: a dict that journals each write with the current event's partition."""

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal

    def __setitem__(self, key: bytes, value: dict[str, Any]) -> None:
        if key == FAILING_USER:
            raise OSError("disk full")
        event = current_event()
        partition = event.message.partition if event is not None else None
        self.journal.entries.append(("state", key, partition))
        # Stored as the JSON that Faust writes, so a later read gets a fresh dict.
        super().__setitem__(key, json.dumps(value))

    def get(self, key: bytes, default: Any = None) -> Any:
        raw = super().get(key)
        return default if raw is None else json.loads(raw)


class RecordingTopic:
    """The dead-letter topic: journals each send, and its result is an acknowledged future."""

    def __init__(self, journal: Journal, name: str) -> None:
        self.journal = journal
        self.name = name
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, key: bytes, value: bytes) -> asyncio.Future:
        self.sent.append((key, value))
        self.journal.entries.append((self.name, key))
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _: self.journal.entries.append(("acked", self.name, key)))
        future.set_result(None)
        return future


class RecordingSampleProducer:
    """The sample producer: journals each sample, then one acknowledgement for the call."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sent: list[bytes] = []

    async def send(self, samples: list[Sample]) -> None:
        for sample in samples:
            self.sent.append(encode(sample))
            self.journal.entries.append(("sample", sample.user_id))
        await asyncio.sleep(0)
        self.journal.entries.append(("acked", len(samples)))


@dataclass
class FakeWorker:
    """The attributes of ``streams.app.Worker`` that ``streams.processing`` uses."""

    journal: Journal
    machine: UserStateMachine
    policy: PolicyFollower
    users: RecordingTable = field(init=False)
    sample_producer: RecordingSampleProducer = field(init=False)
    dead_letters_topic: RecordingTopic = field(init=False)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    batch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.users = RecordingTable(self.journal)
        self.sample_producer = RecordingSampleProducer(self.journal)
        self.dead_letters_topic = RecordingTopic(self.journal, "dead")


def cluster_of(video: int) -> int | None:
    if video == BROKEN_VIDEO:
        raise KeyError(f"no cluster row for video {video}")
    return video % CLUSTERS


def make_worker() -> FakeWorker:
    settings = Settings(data_dir=None, clusters=CLUSTERS)
    machine = UserStateMachine(CLUSTERS, cluster_of, settings.score_decay)
    return FakeWorker(Journal(), machine, PolicyFollower(settings))


def impression(user: int, session: int, offset_min: int, video: int) -> Impression:
    return Impression(
        event_id=f"{user}:{session}:{offset_min}:{video}",
        user_id=user,
        video_id=video,
        time_ms=session + offset_min * MINUTE,
        session_id=session,
        click=1,
        long_view=1,
        like=0,
        comment=0,
        forward=0,
        follow=0,
        hate=0,
        play_time_ms=5_000,
        duration_ms=10_000,
        tab=1,
    )


def opening(user: int, session: int, previous: int | None, count: int) -> Return:
    return Return(
        event_id=f"return:{user}:{session}",
        user_id=user,
        time_ms=session,
        session_id=session,
        previous_session_id=previous,
        previous_session_impressions=count,
        gap_ms=None if previous is None else session - previous - 5 * MINUTE,
    )


def events_of(records: list[Any], topic: str) -> list[Event]:
    """Events with one partition per user (user id modulo 3) and offsets in order."""
    events = []
    for offset, record in enumerate(records):
        raw = record if isinstance(record, bytes) else encode(record)
        user = record.user_id if not isinstance(record, bytes) else 1
        message = Message(str(user).encode(), raw, topic, user % 3, offset)
        events.append(Event(message))
    return events


def two_sessions(user: int, videos: list[int]) -> tuple[list[Impression], list[Return]]:
    """Two sessions a day apart: the second one's return closes the first, which emits a sample."""
    first, second = T0, T0 + 86_400_000
    impressions = [impression(user, first, i, video) for i, video in enumerate(videos)]
    returns = [opening(user, first, None, 0), opening(user, second, first, len(videos))]
    return impressions, returns


def run(worker: FakeWorker, kind: str, events: list[Event]) -> None:
    asyncio.run(process_batch(worker, kind, events))


def test_batch_writes_each_user_once():
    batched, single = make_worker(), make_worker()
    impressions = []
    for user in (11, 12, 13):
        impressions += two_sessions(user, [1, 2, 3, 5])[0]
    impressions.sort(key=lambda record: record.time_ms)
    events = events_of(impressions, "impressions")

    run(batched, IMPRESSIONS, events)
    for event in events:
        run(single, IMPRESSIONS, [event])

    writes = [entry for entry in batched.journal.entries if entry[0] == "state"]
    assert sorted(key for _, key, _ in writes) == [b"11", b"12", b"13"]
    # Each write names its user's own partition, which is where Faust's store puts it.
    assert all(partition == int(key) % 3 for _, key, partition in writes)
    for key in (b"11", b"12", b"13"):
        assert batched.users.get(key) == single.users.get(key)
    assert batched.metrics.applied == single.metrics.applied == {"impressions": 12}
    assert batched.metrics.users_per_level == single.metrics.users_per_level


def test_samples_acknowledged_before_states_stored():
    worker = make_worker()
    impressions, returns = two_sessions(21, [1, 2])
    run(worker, IMPRESSIONS, events_of(impressions, "impressions"))
    worker.journal.entries.clear()

    run(worker, RETURNS, events_of(returns, "returns"))

    kinds = [entry[0] for entry in worker.journal.entries]
    assert kinds == ["sample", "acked", "state"]
    assert worker.metrics.samples_emitted == 1
    sample = json.loads(worker.sample_producer.sent[0])
    assert (sample["user_id"], sample["session_id"]) == (21, T0)


def test_unexpected_error_dead_letters_only_its_record():
    worker, reference = make_worker(), make_worker()
    impressions = two_sessions(31, [1, 2, BROKEN_VIDEO, 3])[0]
    impressions += two_sessions(32, [4, 5])[0]
    events = events_of(impressions, "impressions")

    run(worker, IMPRESSIONS, events)
    good = [event for event in events if b'"video_id":666' not in event.message.value]
    run(reference, IMPRESSIONS, good)

    letters = [json.loads(value) for _, value in worker.dead_letters_topic.sent]
    assert [(letter["reason"], letter["offset"]) for letter in letters] == [("processing_error", 2)]
    assert "KeyError" in letters[0]["message"]
    assert worker.metrics.dead_letters == {"processing_error": 1}
    for key in (b"31", b"32"):
        assert worker.users.get(key) == reference.users.get(key)
    assert worker.metrics.applied == {"impressions": 5}


def test_rejected_records_leave_others_applied():
    worker = make_worker()
    impressions = two_sessions(41, [1, 2])[0]
    records: list[Any] = [impressions[0], b"{not json", impressions[1]]
    events = events_of(records, "impressions")
    # A record whose key is another user's id.
    wrong = Event(Message(b"99", encode(impressions[0]), "impressions", 0, 3))

    plan = plan_batch(worker, IMPRESSIONS, [*events, wrong])
    assert [(r.reason, r.event.message.offset) for r in plan.rejected] == [
        ("undecodable", 1),
        ("wrong_key", 3),
    ]
    assert plan.applied == 2
    assert list(plan.changes) == [b"41"]
    assert worker.journal.entries == []  # planning sends and stores nothing


def test_redelivered_batch_counts_duplicates():
    worker = make_worker()
    impressions = two_sessions(51, [1, 2, 3])[0]
    events = events_of(impressions, "impressions")
    run(worker, IMPRESSIONS, events)
    state = worker.users.get(b"51")

    run(worker, IMPRESSIONS, events)

    assert worker.metrics.duplicates == {"impressions": 3}
    again = worker.users.get(b"51")
    assert again.pop("duplicates") == state.pop("duplicates") + 3
    assert again == state


def test_failed_store_dead_letters_batch():
    worker = make_worker()
    impressions = two_sessions(61, [1, 2])[0] + two_sessions(62, [3])[0]
    events = events_of(impressions, "impressions")

    run(worker, IMPRESSIONS, events)

    letters = [json.loads(value) for _, value in worker.dead_letters_topic.sent]
    assert [letter["offset"] for letter in letters] == [0, 1, 2]
    assert {letter["reason"] for letter in letters} == {"processing_error"}
    assert "OSError: disk full" in letters[0]["message"]
    assert worker.metrics.dead_letters == {"processing_error": 3}


def test_failed_store_one_at_a_time():
    # A planning error sends the batch through one record at a time, where a failing store must
    # dead-letter its record instead of stopping the agent.
    worker = make_worker()
    impressions = two_sessions(61, [1])[0] + two_sessions(63, [BROKEN_VIDEO, 2])[0]
    events = events_of(impressions, "impressions")

    run(worker, IMPRESSIONS, events)

    letters = [json.loads(value) for _, value in worker.dead_letters_topic.sent]
    assert [letter["offset"] for letter in letters] == [0, 1]
    assert "OSError: disk full" in letters[0]["message"]
    assert "KeyError" in letters[1]["message"]
    assert worker.users.get(b"63")["impressions"] == 1
