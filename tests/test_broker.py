"""Tests of the managed Kafka broker: real JVM processes on free ports of 127.0.0.1."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer

from sec_online.broker import JARS_MARKER, BrokerError, BrokerStatus, ManagedBroker, _java_major
from sec_online.kafka_admin import TopicSpec, ensure_topics, read_all
from sec_online.settings import Settings

JAVA = "/usr/bin/java"


@pytest.fixture
def make_broker(
    tmp_path: Path, free_ports: Callable[[int], list[int]]
) -> Iterator[Callable[..., ManagedBroker]]:
    """Build brokers on free ports with homes under ``tmp_path``, and stop them after the test.

    Jars come from the usual cache folder unless a test passes its own ``cache_dir``.
    """
    brokers: list[ManagedBroker] = []

    def make(home: str = "broker", **overrides: object) -> ManagedBroker:
        broker_port, controller_port = free_ports(2)
        settings = Settings(
            broker_port=broker_port,
            controller_port=controller_port,
            cache_dir=Settings.from_env().cache_dir,
        )
        settings = dataclasses.replace(settings, **overrides)
        broker = ManagedBroker(settings, home=tmp_path / home)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


def _bin_dir(tmp_path: Path, *, java: bool, fake_mvn: bool) -> tuple[Path, Path]:
    """Create a folder for PATH with a ``java`` link and a ``mvn`` that records being run.

    Returns the folder and the file that the fake ``mvn`` creates when it runs.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    witness = tmp_path / "mvn-was-run"
    if java:
        (bin_dir / "java").symlink_to(JAVA)
    if fake_mvn:
        script = bin_dir / "mvn"
        script.write_text(f"#!/bin/sh\n: > {witness}\nexit 1\n", encoding="utf-8")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir, witness


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for value in values:
            producer.send(topic, key=b"user-1", value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


@pytest.mark.broker
def test_lifecycle_start_status_stop(make_broker: Callable[..., ManagedBroker]) -> None:
    broker = make_broker()
    stopped = broker.status()
    assert stopped.running is False
    assert stopped.pid is None

    status = broker.start()
    assert isinstance(status, BrokerStatus)
    assert status.running is True
    assert status.pid is not None
    assert status.bootstrap == f"127.0.0.1:{broker.settings.broker_port}"
    assert status.version == broker.settings.kafka_version
    assert status.cluster_id
    assert status.data_dir == broker.home / "data"
    assert status.log_file.is_file()
    assert "Kafka Server started" in status.log_file.read_text(encoding="utf-8")
    assert _port_open(broker.settings.broker_port)
    properties = broker.properties_file.read_text(encoding="utf-8")
    assert "auto.create.topics.enable=false" in properties
    assert f"controller.quorum.voters=1@127.0.0.1:{broker.settings.controller_port}" in properties

    again = broker.start()
    assert again.pid == status.pid

    broker.stop()
    after = broker.status()
    assert after.running is False
    assert not broker.pid_file.exists()
    assert not _port_open(broker.settings.broker_port)
    broker.stop()  # stopping a stopped broker is a no-op


@pytest.mark.broker
def test_restart_keeps_data_without_maven(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    first = broker.start()
    topic = "restart-check"
    ensure_topics(first.bootstrap, [TopicSpec(topic, 2)])
    _produce(first.bootstrap, topic, [b"one", b"two", b"three"])
    broker.stop()
    marker = broker.jar_dir / JARS_MARKER
    marker_mtime = marker.stat().st_mtime_ns

    bin_dir, witness = _bin_dir(tmp_path, java=True, fake_mvn=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    second = broker.start()

    assert second.running is True
    assert second.pid != first.pid
    assert second.cluster_id == first.cluster_id
    assert not witness.exists(), "start ran Maven although the jars were cached"
    assert marker.stat().st_mtime_ns == marker_mtime
    values = [record.value for record in read_all(second.bootstrap, topic, timeout_s=30)]
    assert values == [b"one", b"two", b"three"]


@pytest.mark.broker
def test_start_rejects_port_in_use(make_broker: Callable[..., ManagedBroker]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        broker = make_broker(broker_port=taken)
        with pytest.raises(BrokerError) as caught:
            broker.start()
    message = str(caught.value)
    assert f"127.0.0.1:{taken} is already in use" in message
    assert "SEC_BROKER_PORT" in message
    assert broker.status().running is False


@pytest.mark.broker
def test_start_reports_early_exit_with_log(make_broker: Callable[..., ManagedBroker]) -> None:
    broker = make_broker()
    broker.start()
    broker.stop()
    # A node id that differs from server.properties makes Kafka exit at once.
    meta = broker.data_dir / "meta.properties"
    meta.write_text(meta.read_text(encoding="utf-8").replace("node.id=1", "node.id=7"))

    with pytest.raises(BrokerError) as caught:
        broker.start(timeout_s=60)
    message = str(caught.value)
    assert "exited during startup with code" in message
    assert "Stored node id 7 doesn't match" in message
    assert str(broker.log_file) in message
    assert broker.status().running is False
    assert not broker.pid_file.exists()


def test_status_ignores_pid_of_other_process(
    make_broker: Callable[..., ManagedBroker],
) -> None:
    broker = make_broker()
    broker.home.mkdir(parents=True)
    # The pid of this test process plays a pid that the system reused.
    broker.pid_file.write_text(
        f'{{"pid": {os.getpid()}, "bootstrap": "{broker.bootstrap}", "version": "4.1.1"}}'
    )
    assert broker.status().running is False
    broker.stop()  # must not signal this process
    assert not broker.pid_file.exists()


def test_status_ignores_unreadable_pid_file(make_broker: Callable[..., ManagedBroker]) -> None:
    broker = make_broker()
    broker.home.mkdir(parents=True)
    broker.pid_file.write_text("not json")
    assert broker.status().running is False


def test_ensure_jars_without_maven_names_fix(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(cache_dir=tmp_path / "empty-cache")
    bin_dir, _ = _bin_dir(tmp_path, java=True, fake_mvn=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(BrokerError, match=r"`mvn` not found on PATH; install Apache Maven"):
        broker.ensure_jars()


def test_start_without_java_names_fix(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    bin_dir, _ = _bin_dir(tmp_path, java=False, fake_mvn=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match=r"`java` not found on PATH; install a Java 17\+"):
        broker.start()


def test_ensure_jars_reports_maven_failure(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path
) -> None:
    broker = make_broker(cache_dir=tmp_path / "cache", kafka_version="0.0.0-missing")
    with pytest.raises(BrokerError) as caught:
        broker.ensure_jars()
    message = str(caught.value)
    assert "Maven failed to resolve org.apache.kafka:kafka_2.13:0.0.0-missing" in message
    assert "[ERROR]" in message  # the tail of Maven's own output
    assert not (broker.jar_dir / JARS_MARKER).exists()


def test_ensure_jars_ignores_half_download(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker(cache_dir=tmp_path / "cache")
    libs = broker.jar_dir / "libs"
    libs.mkdir(parents=True)
    (libs / f"kafka_2.13-{broker.version}.jar").write_bytes(b"truncated")
    bin_dir, witness = _bin_dir(tmp_path, java=True, fake_mvn=True)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(BrokerError, match="Maven failed"):
        broker.ensure_jars()
    assert witness.exists(), "a folder without the marker must be resolved again"


@pytest.mark.parametrize(
    ("port", "controller_port", "fragment"),
    [(0, 9093, "invalid port 0"), (9092, 70000, "invalid port 70000"), (9092, 9092, "must differ")],
)
def test_invalid_ports_rejected(port: int, controller_port: int, fragment: str) -> None:
    settings = Settings(broker_port=port, controller_port=controller_port)
    with pytest.raises(BrokerError, match=fragment):
        ManagedBroker(settings)


@pytest.mark.parametrize(
    ("output", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('java version "1.8.0_392"', 8),
        ("no version here", None),
    ],
)
def test_java_major_parses_version_output(output: str, major: int | None) -> None:
    assert _java_major(output) == major


def test_start_rejects_old_java(
    make_broker: Callable[..., ManagedBroker], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = make_broker()
    bin_dir, _ = _bin_dir(tmp_path, java=False, fake_mvn=False)
    old_java = bin_dir / "java"
    old_java.write_text("#!/bin/sh\necho 'java version \"1.8.0_392\"' >&2\n", encoding="utf-8")
    old_java.chmod(old_java.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerError, match=r"Kafka needs Java 17 or newer"):
        broker.start()


@pytest.mark.broker
def test_start_timeout_stops_process(make_broker: Callable[..., ManagedBroker]) -> None:
    broker = make_broker()
    # The JVM alone needs longer than this to open its listener.
    with pytest.raises(BrokerError) as caught:
        broker.start(timeout_s=0.5)
    message = str(caught.value)
    assert f"did not respond on {broker.bootstrap} within 0.5 s" in message
    assert "it was stopped" in message
    assert broker.status().running is False
    assert not broker.pid_file.exists()
    assert not _port_open(broker.settings.broker_port)
