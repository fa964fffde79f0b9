"""Worker processes under measurement: start them, time the replay through them, stop them.

Throughput comes from the consumer group's committed offsets on the event topics, polled every
``POLL_S``. The workers' ``/stats/`` counters would count twice the events that a worker read
but had not committed when a rebalance moved their partition to another worker. The rate is
taken between the first poll that finds a committed offset and the first poll that finds them
all, so worker start-up is not counted. Faust commits every second (``broker_commit_interval``),
which bounds the error at each end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sec_online import topics
from sec_online.kafka_admin import committed_offsets, delete_topics
from sec_online.runtime import create_topics
from sec_online.settings import Settings
from sec_online.workerproc import WorkerProcess

logger = logging.getLogger(__name__)

BENCH_PREFIX = "bench."
BENCH_APP_ID = "sec-online-bench"
POLL_S = 0.5
# A run fails when the committed offsets stop moving for this long before the end.
STALL_S = 180.0


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 at the time of the call."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def phase_settings(base: Settings, phase: str, work_dir: Path) -> Settings:
    """Settings of one benchmark phase: its own topics, consumer group and table folders."""
    return dataclasses.replace(
        base,
        topic_prefix=f"{BENCH_PREFIX}{phase}.",
        app_id=f"{BENCH_APP_ID}-{phase}",
        work_dir=work_dir / phase,
        web_port=free_port(),
    )


def delete_bench_topics(bootstrap: str) -> list[str]:
    """Delete every topic of earlier benchmark runs, and nothing else; returns their names."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id=BENCH_APP_ID)
    try:
        existing = admin.list_topics()
    finally:
        admin.close()
    stale = sorted(name for name in existing if name.startswith((BENCH_PREFIX, BENCH_APP_ID + "-")))
    if stale:
        logger.info("deleting benchmark topics: %s", ", ".join(stale))
        delete_topics(bootstrap, stale)
    return stale


class WorkerGroup:
    """Worker processes of one consumer group, sharing the partitions of one phase's topics."""

    def __init__(self, settings: Settings, count: int, log_dir: Path) -> None:
        create_topics(settings)
        self.settings = settings
        self.workers = [
            WorkerProcess(
                dataclasses.replace(
                    settings, web_port=settings.web_port if i == 0 else free_port()
                ),
                log_dir / f"{settings.app_id}-{i}.log",
            )
            for i in range(count)
        ]

    def start(self) -> WorkerGroup:
        """Start every worker and wait until each web server responds."""
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            worker.wait_healthy()
        return self

    def stop(self) -> None:
        """Stop every worker that is still running."""
        for worker in self.workers:
            code = worker.stop()
            logger.info("worker %s stopped with code %s", worker.base_url, code)

    def stats(self) -> list[dict[str, Any]]:
        """Fetch the ``/stats/`` page of every worker, in start order."""
        for worker in self.workers:
            worker.check_alive("under measurement")
        return [worker.get("/stats/", timeout_s=30.0) for worker in self.workers]

    def consumed(self) -> int:
        """Impressions and returns consumed by all workers together."""
        return sum(sum(stats["consumed"].values()) for stats in self.stats())

    def committed(self) -> int:
        """Sum of the group's committed offsets over every partition of the event topics."""
        names = (self.settings.topic(topics.IMPRESSIONS), self.settings.topic(topics.RETURNS))
        return sum(
            sum(committed_offsets(self.settings.bootstrap, self.settings.app_id, name).values())
            for name in names
        )

    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [worker.process.pid for worker in self.workers if worker.process is not None]


def time_consumption(group: WorkerGroup, total: int, timeout_s: float, progress: bool) -> dict:
    """Poll the committed offsets until they cover ``total`` events; returns the rates.

    ``events_per_second`` is taken from the first poll that finds a commit to the first poll
    that finds them all. ``steady_events_per_second`` covers only the second half of the events,
    after start-up costs such as the trainer's first imports.

    Raises
    ------
    TimeoutError
        After ``timeout_s``, or when the offsets do not move for ``STALL_S``.
    """
    deadline = time.monotonic() + timeout_s
    polls: list[tuple[float, int]] = []
    cpu: list[float] = []
    last_move = time.monotonic()
    with tqdm(total=total, unit="event", desc="pipeline", disable=not progress) as bar:
        while time.monotonic() < deadline:
            group.stats()  # raises if a worker exited
            committed = group.committed()
            now = time.perf_counter()
            if committed > 0 and (not polls or committed > polls[-1][1]):
                bar.update(committed - (polls[-1][1] if polls else 0))
                polls.append((now, committed))
                cpu.append(sum(cpu_seconds(pid) for pid in group.pids()))
                last_move = time.monotonic()
            if committed >= total:
                return {**_rates(polls, total), **_cpu_use(polls, cpu)}
            if time.monotonic() - last_move > STALL_S:
                break
            time.sleep(POLL_S)
    done = polls[-1][1] if polls else 0
    consumed = [stats["consumed"] for stats in group.stats()]
    raise TimeoutError(
        f"the workers committed {done} of {total} events and then stopped moving (stall "
        f"limit {STALL_S:.0f} s, timeout {timeout_s:.0f} s); consumed per worker: {consumed}; "
        "see the worker logs"
    )


def _rates(polls: list[tuple[float, int]], total: int) -> dict[str, float]:
    first, last = polls[0], polls[-1]
    half = next(poll for poll in polls if poll[1] >= total / 2)
    if half == last:
        half = first
    return {
        "events_per_second": _rate(first, last),
        "steady_events_per_second": _rate(half, last),
        "seconds": last[0] - first[0],
        "events_timed": last[1] - first[1],
        "consumed_at_first_poll": first[1],
    }


def _cpu_use(polls: list[tuple[float, int]], cpu: list[float]) -> dict[str, float]:
    """CPU time of the workers between the first and the last poll, per second and per event."""
    seconds = polls[-1][0] - polls[0][0]
    events = polls[-1][1] - polls[0][1]
    used = cpu[-1] - cpu[0]
    return {
        "worker_cpu_seconds": used,
        "worker_cpu_share": used / seconds if seconds > 0 else 0.0,
        "worker_cpu_us_per_event": 1e6 * used / events if events > 0 else 0.0,
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far, from /proc (Linux only)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(first: tuple[float, int], last: tuple[float, int]) -> float:
    seconds = last[0] - first[0]
    events = last[1] - first[1]
    if seconds <= 0 or events <= 0:
        # Everything was consumed between two polls: this is only a lower bound.
        return last[1] / POLL_S
    return events / seconds


def wait_idle(group: WorkerGroup, total: int, timeout_s: float) -> list[dict[str, Any]]:
    """Wait until the trainer trained on every emitted sample and published; returns stats."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = group.stats()
        consumed = sum(sum(s["consumed"].values()) for s in stats)
        emitted = sum(s["samples_emitted"] for s in stats)
        trainers = [s["trainer"] for s in stats if s["trainer"]["active"]]
        trained = sum(t["samples_consumed"] + t["invalid_samples"] for t in trainers)
        published = all(t["published_samples_consumed"] >= t["samples_consumed"] for t in trainers)
        if consumed >= total and trainers and trained >= emitted and published:
            return stats
        time.sleep(POLL_S * 2)
    raise TimeoutError(
        f"the trainer did not publish a policy over every sample within {timeout_s:.0f} s"
    )


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc, or None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
