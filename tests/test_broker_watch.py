"""The worker's broker watch: one WARNING while the broker is down, Kafka client repeats dropped."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from streams.broker_watch import (
    WARNING_INTERVAL_S,
    BrokerWatch,
    RepeatFilter,
    install_repeat_filter,
    reachable,
)


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, msg, args, None)


def test_repeat_filter_drops_and_counts(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 31.0])
    monkeypatch.setattr("streams.broker_watch.time.monotonic", lambda: next(clock))
    repeat_filter = RepeatFilter(interval_s=30.0)
    template = "Unable connect to node with id %s: %s"
    assert repeat_filter.filter(_record(template, 1, "refused"))
    assert not repeat_filter.filter(_record(template, 1, "refused"))
    assert not repeat_filter.filter(_record(template, 1, "refused"))
    passed = _record(template, 1, "refused")
    assert repeat_filter.filter(passed)
    assert passed.getMessage() == (
        "Unable connect to node with id 1: refused (2 similar lines dropped)"
    )


def test_repeat_filter_keeps_other_templates():
    repeat_filter = RepeatFilter(interval_s=30.0)
    assert repeat_filter.filter(_record("first %s", 1))
    assert repeat_filter.filter(_record("second %s", 1))


def test_install_repeat_filter_once():
    first = install_repeat_filter()
    assert install_repeat_filter() is first
    count = sum(isinstance(f, RepeatFilter) for f in logging.getLogger("aiokafka").filters)
    assert count == 1


def test_watch_warns_while_down(caplog):
    watch = BrokerWatch("127.0.0.1:1")
    with caplog.at_level(logging.INFO, logger="streams.broker_watch"):
        watch.update(False, 100.0)
        watch.update(False, 102.0)
        watch.update(False, 100.0 + WARNING_INTERVAL_S)
        watch.update(True, 125.0)
        watch.update(True, 127.0)
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == ["WARNING", "WARNING", "INFO"]
    assert "127.0.0.1:1 unreachable for 0 s" in messages[0][1]
    assert "retry with backoff" in messages[0][1]
    assert "unreachable for 10 s" in messages[1][1]
    assert messages[2][1] == "Kafka broker 127.0.0.1:1 reachable again after 25 s"
    assert watch.down_since is None


def test_reachable_probe():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert asyncio.run(reachable(f"127.0.0.1:{port}"))
        assert asyncio.run(reachable(f"127.0.0.1:bad,127.0.0.1:{port}"))
    assert not asyncio.run(reachable(f"127.0.0.1:{port}"))


@pytest.mark.parametrize("bootstrap", ["", "no-port", "127.0.0.1:notanumber"])
def test_reachable_invalid_address(bootstrap):
    assert not asyncio.run(reachable(bootstrap))
