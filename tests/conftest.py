"""Shared fixtures: one real Kafka broker per test session and unique topic names per test.

Tests that use ``kafka_bootstrap`` get the ``broker`` marker, so ``pytest -m "not broker"`` runs
the rest on machines without Java. With ``SEC_TEST_BOOTSTRAP_SERVERS`` set, the tests use that
cluster instead of starting a broker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sec_online.broker import BrokerError, ManagedBroker
from sec_online.kafka_admin import wait_for_broker
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

EXTERNAL_BOOTSTRAP_ENV = "SEC_TEST_BOOTSTRAP_SERVERS"
TEST_BROKER_PORT = 19092
TEST_CONTROLLER_PORT = 19093
# The first start on a machine also resolves the jars with Maven, which is not counted here.
BROKER_START_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the session broker with ``broker``."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.broker)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a running Kafka cluster for the whole session.

    The managed broker listens on 127.0.0.1:19092 (controller 19093), or on free ports when
    another session uses those. It keeps its data in a temporary folder, but its jars come
    from the usual ``SEC_CACHE_DIR``, so Maven runs at most once per machine.
    """
    external = os.environ.get(EXTERNAL_BOOTSTRAP_ENV)
    if external:
        wait_for_broker(external, timeout_s=30.0)
        yield external
        return
    home = tmp_path_factory.mktemp("kafka-broker")
    try:
        # Sessions started at the same moment would otherwise both find 19092 free.
        with _machine_lock():
            ports = [TEST_BROKER_PORT, TEST_CONTROLLER_PORT]
            if not _ports_free(ports):
                # Another test session on this machine uses them. Sessions must not share one.
                ports = _pick_free_ports(2)
                logger.warning("ports 19092/19093 are taken, the test broker uses %s", ports)
            settings = dataclasses.replace(
                Settings.from_env(),
                bootstrap_servers="",
                broker_port=ports[0],
                controller_port=ports[1],
            )
            broker = ManagedBroker(settings, home=home)
            status = broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    except BrokerError as exc:
        pytest.fail(
            f"the test Kafka broker did not start: {exc}\n"
            f'Run `pytest -m "not broker"` to skip the tests that need Kafka, or set '
            f"{EXTERNAL_BOOTSTRAP_ENV} to a running cluster.",
            pytrace=False,
        )
    try:
        yield status.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """Topic prefix unique to this test run, such as ``t-1a2b3c4d-9f8e7d6c-``.

    The first hash identifies the test, the second part the run, so reruns against a shared
    cluster never see older records.
    """
    test_hash = hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    return f"t-{test_hash}-{uuid.uuid4().hex[:8]}-"


@pytest.fixture
def free_ports() -> Callable[[int], list[int]]:
    """Return a function that picks ``n`` distinct TCP ports that are free on 127.0.0.1."""
    return _pick_free_ports


def _pick_free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Hold a lock shared by every test session on this machine while a broker starts."""
    path = Path(tempfile.gettempdir()) / "sec-online-test-broker.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="session")
def kuairand_dir() -> Path:
    """The KuaiRand data folder of SEC_DATA_DIR (or its default); skips the test without one."""
    folder = Settings.from_env().data_dir
    if folder is None or not folder.is_dir():
        pytest.skip("no KuaiRand data folder: set SEC_DATA_DIR (see the README's Data section)")
    return folder


@pytest.fixture(scope="session")
def clustered_settings(
    tmp_path_factory: pytest.TempPathFactory, kuairand_dir: Path
) -> Callable[..., Settings]:
    """Return a function that builds settings on the data folder with a new work folder.

    ``build(name, **overrides)`` also computes the video clusters into that folder, which the
    workers started with those settings read.
    """

    def build(name: str, **overrides: object) -> Settings:
        from sec_online.clusters import build_clusters

        settings = dataclasses.replace(
            Settings.from_env(),
            data_dir=kuairand_dir,
            work_dir=tmp_path_factory.mktemp(name),
            **overrides,
        )
        build_clusters(settings)
        return settings

    return build
