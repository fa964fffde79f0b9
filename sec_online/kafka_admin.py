"""Kafka administration on kafka-python: readiness, topics, offsets and full topic reads.

Every function opens its own short-lived client for the ``bootstrap`` servers
(``"host:port[,host:port]"``) and closes it before returning, so callers hold no connection
state. Failures to reach the cluster raise ``BrokerUnavailable``, whose message explains how to
start the managed broker or point sec-online at another cluster.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kafka.errors as kafka_errors
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import OffsetSpec
from kafka.consumer.fetcher import ConsumerRecord

logger = logging.getLogger(__name__)
T = TypeVar("T")

CLIENT_ID = "sec-online-admin"
# Kafka topic names: at most 249 characters from this set.
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# Pauses between the attempts of wait_for_broker, in seconds: doubling up to a cap.
FIRST_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 5.0
TOPIC_ALREADY_EXISTS = kafka_errors.TopicAlreadyExistsError.errno
UNKNOWN_TOPIC = kafka_errors.UnknownTopicOrPartitionError.errno
_CONNECTION_ERRORS = (
    kafka_errors.KafkaTimeoutError,
    kafka_errors.KafkaConnectionError,
    kafka_errors.MetadataEmptyBrokerList,
)


class KafkaAdminError(RuntimeError):
    """An administrative request to the Kafka cluster failed."""


class BrokerUnavailable(KafkaAdminError):
    """No broker of the cluster responded."""

    def __init__(self, bootstrap: str, reason: object) -> None:
        super().__init__(
            f"Kafka broker not reachable at {bootstrap}: {reason}. Start it with "
            f"`sec-online broker start` or set SEC_BOOTSTRAP_SERVERS to a running cluster"
        )
        self.bootstrap = bootstrap


class TopicNotFound(KafkaAdminError):
    """A topic that a request needs does not exist."""


class TopicLayoutError(KafkaAdminError):
    """An existing topic has a layout that differs from the requested one."""


@dataclass(frozen=True)
class TopicSpec:
    """Requested layout of one topic.

    Parameters
    ----------
    name
        Full topic name, prefix included.
    partitions
        Number of partitions, at least 1.
    config
        Topic-level configuration, for example ``{"cleanup.policy": "compact"}``.
    """

    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not TOPIC_NAME.fullmatch(self.name) or self.name in (".", ".."):
            raise ValueError(
                f"invalid topic name {self.name!r}: use 1 to 249 characters from "
                f"a-z, A-Z, 0-9, '.', '_' and '-'"
            )
        if self.partitions < 1:
            raise ValueError(
                f"invalid partition count {self.partitions} for topic {self.name}: "
                f"must be at least 1"
            )


class _AdminClient(KafkaAdminClient):
    """KafkaAdminClient that releases its I/O thread when the first connection fails.

    kafka-python 3.0.12 starts a network thread in ``__init__`` before it bootstraps, and leaves
    that thread running when bootstrapping raises. A retry loop would leak one thread per try.
    """

    def __init__(self, **configs: Any) -> None:
        try:
            super().__init__(**configs)
        except BaseException:
            client = getattr(self, "_client", None)
            if client is not None:
                client.close()
            network = getattr(self, "_net", None)
            if network is not None:
                network.stop()
            raise


@contextmanager
def _admin(bootstrap: str, timeout_s: float) -> Iterator[KafkaAdminClient]:
    """Open an admin client. Connection failures, also later ones, raise BrokerUnavailable."""
    timeout_ms = max(int(timeout_s * 1000), 100)
    try:
        client = _AdminClient(
            bootstrap_servers=_servers(bootstrap),
            client_id=CLIENT_ID,
            bootstrap_timeout_ms=timeout_ms,
            request_timeout_ms=max(timeout_ms, 1000),
        )
    except _CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(bootstrap, exc) from exc
    try:
        yield client
    except _CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(bootstrap, exc) from exc
    finally:
        client.close()


def _servers(bootstrap: str) -> list[str]:
    servers = [server.strip() for server in bootstrap.split(",") if server.strip()]
    if not servers:
        raise ValueError(
            f"invalid bootstrap servers {bootstrap!r}: expected 'host:port[,host:port]'"
        )
    return servers


# Readiness.
def describe_cluster(bootstrap: str, timeout_s: float) -> dict[str, Any]:
    """Send one DescribeCluster request and return kafka-python's result.

    Returns
    -------
    dict
        Contains ``cluster_id``, ``controller_id`` and ``brokers`` (a list of dicts with
        ``broker_id``, ``host`` and ``port``).

    Raises
    ------
    BrokerUnavailable
        If no broker responds within ``timeout_s`` seconds.
    """
    with _admin(bootstrap, timeout_s) as admin:
        return admin.describe_cluster()


def wait_for_broker(bootstrap: str, timeout_s: float) -> None:
    """Wait until a broker of ``bootstrap`` responds, retrying with growing pauses.

    Each failed attempt is logged at WARNING as ``attempt n/N``. N is fixed up front from
    ``timeout_s`` because every attempt ends by the time the next one is due.

    Raises
    ------
    BrokerUnavailable
        If no attempt succeeds within ``timeout_s`` seconds.
    """
    schedule = _attempt_schedule(timeout_s)
    started = time.monotonic()
    last_error: BrokerUnavailable | None = None
    for number, due in enumerate(schedule, start=1):
        _sleep_until(started + due)
        next_due = schedule[number] if number < len(schedule) else timeout_s
        budget = max(next_due - (time.monotonic() - started), 0.1)
        try:
            describe_cluster(bootstrap, budget)
        except BrokerUnavailable as exc:
            last_error = exc
            logger.warning(
                "Kafka broker not reachable bootstrap=%s attempt=%d/%d error=%s",
                bootstrap,
                number,
                len(schedule),
                exc.__cause__ or exc,
            )
            continue
        logger.info(
            "Kafka broker reachable bootstrap=%s attempt=%d duration_s=%.1f",
            bootstrap,
            number,
            time.monotonic() - started,
        )
        return
    reason = f"no response within {timeout_s:g} s ({last_error.__cause__ if last_error else ''})"
    raise BrokerUnavailable(bootstrap, reason)


def _attempt_schedule(timeout_s: float) -> list[float]:
    """Return the start times of the attempts, in seconds after the first one."""
    schedule, at, delay = [], 0.0, FIRST_RETRY_DELAY_S
    while at < timeout_s or not schedule:
        schedule.append(at)
        at += delay
        delay = min(delay * 2, MAX_RETRY_DELAY_S)
    return schedule


def _sleep_until(moment: float) -> None:
    remaining = moment - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


# Topics.
def ensure_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec],
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics and check the partition counts of existing ones.

    Parameters
    ----------
    replication_factor
        Replicas of each created topic. The managed broker is a single node, so 1.
    timeout_s
        Seconds to wait for the broker, and then for the topics to have a leader for every
        partition.

    Returns
    -------
    list of str
        Names of the topics that this call created.

    Raises
    ------
    TopicLayoutError
        If an existing topic has another partition count than its spec. Existing topic
        configuration is not compared.
    KafkaAdminError
        If the broker rejects a topic, for example a replication factor above the broker count.
    """
    specs = list(specs)
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"topic specs repeat a name: {sorted(names)}")
    if not specs:
        return []
    with _admin(bootstrap, timeout_s) as admin:
        counts = _partition_counts(admin, names)
        missing = [spec for spec in specs if counts[spec.name] is None]
        created = _create_topics(admin, missing, replication_factor, timeout_s) if missing else []
        _wait_for_topics(admin, names, timeout_s)
        counts = _partition_counts(admin, names)
    _check_partition_counts(bootstrap, specs, counts)
    return created


def _partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int | None]:
    """Map each topic name to its partition count, or None if the topic does not exist."""
    counts: dict[str, int | None] = dict.fromkeys(names)
    for topic in admin.describe_topics(names):
        if topic["error_code"] == 0:
            counts[topic["name"]] = len(topic["partitions"])
    return counts


def _create_topics(
    admin: KafkaAdminClient, specs: list[TopicSpec], replication_factor: int, timeout_s: float
) -> list[str]:
    request = {
        spec.name: {
            "num_partitions": spec.partitions,
            "replication_factor": replication_factor,
            "configs": dict(spec.config),
        }
        for spec in specs
    }
    response = admin.create_topics(
        request, timeout_ms=max(int(timeout_s * 1000), 1000), raise_errors=False
    )
    created = []
    for topic in response["topics"]:
        code = topic["error_code"]
        # Another client may create the same topic between our describe and create.
        if code == TOPIC_ALREADY_EXISTS:
            continue
        if code != 0:
            error = kafka_errors.for_code(code).__name__
            raise KafkaAdminError(
                f"creating topic {topic['name']} failed with {error}: {topic['error_message']} "
                f"(request: {request[topic['name']]})"
            )
        created.append(topic["name"])
        logger.info(
            "created topic topic=%s partitions=%d replication_factor=%d config=%s",
            topic["name"],
            request[topic["name"]]["num_partitions"],
            replication_factor,
            request[topic["name"]]["configs"],
        )
    return created


def _wait_for_topics(admin: KafkaAdminClient, names: list[str], timeout_s: float) -> None:
    try:
        admin.wait_for_topics(names, timeout_ms=max(int(timeout_s * 1000), 1000))
    except kafka_errors.KafkaTimeoutError as exc:
        raise KafkaAdminError(
            f"topics {names} exist but not every partition had a leader after {timeout_s:g} s; "
            f"check the broker log"
        ) from exc


def _check_partition_counts(
    bootstrap: str, specs: list[TopicSpec], counts: dict[str, int | None]
) -> None:
    wrong = [spec for spec in specs if counts[spec.name] != spec.partitions]
    if not wrong:
        return
    details = "; ".join(
        f"{spec.name} has {counts[spec.name]} partitions, expected {spec.partitions}"
        for spec in wrong
    )
    raise TopicLayoutError(
        f"existing topics on {bootstrap} have other partition counts: {details}. Kafka cannot "
        f"remove partitions, and adding some moves keys to other partitions. Delete the topics "
        f"(their records are lost), use another SEC_TOPIC_PREFIX, or set SEC_PARTITIONS to the "
        f"existing count"
    )


def delete_topics(bootstrap: str, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Delete topics and wait until they are gone from the metadata. Missing topics are skipped."""
    names = list(names)
    if not names:
        return
    with _admin(bootstrap, timeout_s) as admin:
        response = admin.delete_topics(
            names, timeout_ms=max(int(timeout_s * 1000), 1000), raise_errors=False
        )
        for topic in response["topics"]:
            code = topic["error_code"]
            if code not in (0, UNKNOWN_TOPIC):
                error = kafka_errors.for_code(code).__name__
                raise KafkaAdminError(f"deleting topic {topic['name']} failed with {error}")
        _wait_until_deleted(admin, names, timeout_s)
    logger.info("deleted topics topics=%s", names)


def _wait_until_deleted(admin: KafkaAdminClient, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = set(names) & set(admin.list_topics())
        if not remaining:
            return
        if time.monotonic() >= deadline:
            raise KafkaAdminError(
                f"topics {sorted(remaining)} still listed {timeout_s:g} s after deletion"
            )
        time.sleep(0.1)


# Offsets.
def _retry(request: Callable[[], T], what: str, deadline: float) -> T:
    """Call ``request`` again while it raises retriable Kafka errors and time is left.

    A new consumer group, for example, has no coordinator until the broker has created the
    ``__consumer_offsets`` topic, and Kafka reports that as a retriable error.
    """
    attempt, delay = 1, 0.1
    while True:
        try:
            return request()
        except _CONNECTION_ERRORS:
            raise
        except kafka_errors.KafkaError as exc:
            if not exc.retriable or time.monotonic() + delay >= deadline:
                raise KafkaAdminError(f"{what} failed after {attempt} attempts: {exc}") from exc
            logger.debug("%s failed attempt=%d error=%s; retrying", what, attempt, exc)
        time.sleep(delay)
        attempt, delay = attempt + 1, min(delay * 2, 1.0)


def _partitions_of(admin: KafkaAdminClient, bootstrap: str, topic: str) -> list[int]:
    (described,) = admin.describe_topics([topic])
    if described["error_code"] == UNKNOWN_TOPIC:
        raise TopicNotFound(f"topic {topic} not found on {bootstrap}")
    if described["error_code"] != 0:
        error = kafka_errors.for_code(described["error_code"]).__name__
        raise KafkaAdminError(f"describing topic {topic} on {bootstrap} failed with {error}")
    return sorted(partition["partition_index"] for partition in described["partitions"])


def end_offsets(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """Return the offset that the next record of each partition will get.

    Raises
    ------
    TopicNotFound
        If the topic does not exist.
    """
    return _list_offsets(bootstrap, topic, OffsetSpec.LATEST, timeout_s)


def offset_ranges(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[int, list[int]]:
    """Return ``[first, end)`` offsets of each partition: the records a full read would get."""
    deadline = time.monotonic() + timeout_s
    firsts = _list_offsets(bootstrap, topic, OffsetSpec.EARLIEST, timeout_s)
    ends = _list_offsets(bootstrap, topic, OffsetSpec.LATEST, max(deadline - time.monotonic(), 1))
    return {partition: [firsts[partition], ends[partition]] for partition in sorted(ends)}


def _list_offsets(bootstrap: str, topic: str, spec: Any, timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    with _admin(bootstrap, timeout_s) as admin:
        partitions = _partitions_of(admin, bootstrap, topic)
        specs = {TopicPartition(topic, partition): spec for partition in partitions}
        offsets = _retry(
            lambda: admin.list_partition_offsets(specs, timeout_ms=_remaining_ms(deadline)),
            f"listing offsets of topic {topic}",
            deadline,
        )
    return {tp.partition: found.offset for tp, found in offsets.items()}


def committed_offsets(
    bootstrap: str, group: str, topic: str, timeout_s: float = 30.0
) -> dict[int, int]:
    """Return the consumer group's committed offset of every partition of ``topic``.

    A partition without a committed offset maps to 0, as does every partition of a group that
    never committed.

    Raises
    ------
    TopicNotFound
        If the topic does not exist.
    """
    deadline = time.monotonic() + timeout_s
    with _admin(bootstrap, timeout_s) as admin:
        partitions = _partitions_of(admin, bootstrap, topic)
        requested = [TopicPartition(topic, partition) for partition in partitions]
        by_group = _retry(
            lambda: admin.list_group_offsets({group: requested}),
            f"fetching committed offsets of group {group} for topic {topic}",
            deadline,
        )
    offsets = dict.fromkeys(partitions, 0)
    for tp, committed in by_group.get(group, {}).items():
        # Kafka reports -1 for partitions without a commit.
        if tp.topic == topic and committed.offset >= 0:
            offsets[tp.partition] = committed.offset
    return offsets


# Reading.
def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Read every record of ``topic`` up to the end offsets taken when the call starts.

    Records appended after the end offsets were taken are left out.
    No consumer group is used and nothing is committed.

    Returns
    -------
    list of ConsumerRecord
        Undecoded records (bytes key and value), ordered by partition, then offset.

    Raises
    ------
    TopicNotFound
        If the topic does not exist.
    TimeoutError
        If the records up to the end offsets could not be read within ``timeout_s`` seconds.
    """
    records, _ = read_range(bootstrap, topic, timeout_s=timeout_s)
    return records


def read_range(
    bootstrap: str,
    topic: str,
    *,
    start: dict[int, int] | None = None,
    end: dict[int, int] | None = None,
    timeout_s: float = 30.0,
) -> tuple[list[ConsumerRecord], dict[int, tuple[int, int]]]:
    """Read the records of ``topic`` in ``[start, end)`` offsets, per partition.

    A partition missing from ``start`` starts at its beginning offset, and one missing from
    ``end`` ends at the end offset taken when the call starts; an ``end`` past that is cut to it.

    Returns
    -------
    records, offsets
        Undecoded records ordered by partition, then offset, and for each partition the
        ``(start, end)`` offsets actually read, for reports that must say what they read.
    """
    deadline = time.monotonic() + timeout_s
    with _admin(bootstrap, timeout_s) as admin:
        partitions = _partitions_of(admin, bootstrap, topic)
    assigned = [TopicPartition(topic, partition) for partition in partitions]
    consumer = KafkaConsumer(
        bootstrap_servers=_servers(bootstrap),
        client_id=CLIENT_ID,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        consumer.assign(assigned)
        firsts = consumer.beginning_offsets(assigned, timeout_ms=_remaining_ms(deadline))
        lasts = consumer.end_offsets(assigned, timeout_ms=_remaining_ms(deadline))
        begins = {tp: max(firsts[tp], (start or {}).get(tp.partition, 0)) for tp in assigned}
        ends = {tp: min(lasts[tp], (end or {}).get(tp.partition, lasts[tp])) for tp in assigned}
        for tp in assigned:
            consumer.seek(tp, begins[tp])
        records = _read_until(consumer, ends, deadline, topic, timeout_s)
    except _CONNECTION_ERRORS as exc:
        raise BrokerUnavailable(bootstrap, exc) from exc
    finally:
        consumer.close()
    offsets = {tp.partition: (begins[tp], max(begins[tp], ends[tp])) for tp in assigned}
    return [record for tp in assigned for record in records[tp]], offsets


def _read_until(
    consumer: KafkaConsumer,
    ends: dict[TopicPartition, int],
    deadline: float,
    topic: str,
    timeout_s: float,
) -> dict[TopicPartition, list[ConsumerRecord]]:
    records: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in ends}
    pending = _unfinished(consumer, ends, set(ends), deadline)
    while pending:
        if time.monotonic() >= deadline:
            progress = {tp.partition: (consumer.position(tp), ends[tp]) for tp in pending}
            raise TimeoutError(
                f"reading topic {topic} timed out after {timeout_s:g} s; "
                f"partition: (position, end offset) = {progress}"
            )
        batch = consumer.poll(timeout_ms=min(_remaining_ms(deadline), 500))
        for tp, rows in batch.items():
            records[tp].extend(row for row in rows if row.offset < ends[tp])
        pending = _unfinished(consumer, ends, pending, deadline)
    return records


def _unfinished(
    consumer: KafkaConsumer,
    ends: dict[TopicPartition, int],
    pending: set[TopicPartition],
    deadline: float,
) -> set[TopicPartition]:
    """Return the partitions whose position is still before the end offset, and pause the rest."""
    unfinished = set()
    for tp in pending:
        if consumer.position(tp, timeout_ms=_remaining_ms(deadline)) < ends[tp]:
            unfinished.add(tp)
        else:
            consumer.pause(tp)
    return unfinished


def _remaining_ms(deadline: float) -> int:
    return max(int((deadline - time.monotonic()) * 1000), 1)
