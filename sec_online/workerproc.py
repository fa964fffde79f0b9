"""A worker in a child process, driven over its HTTP pages: used by the main job and the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from sec_online.settings import Settings

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5


class WorkerProcessError(RuntimeError):
    """The worker process exited or did not respond in time."""


def worker_env(settings: Settings) -> dict[str, str]:
    """Environment that gives a child worker the same settings as ``settings``."""
    env = dict(os.environ)
    for key, value in settings.public_dict().items():
        env["SEC_" + key.upper()] = "" if value is None else str(value)
    env["SEC_BOOTSTRAP_SERVERS"] = settings.bootstrap
    return env


class WorkerProcess:
    """One ``sec-online worker`` child process with its own log file."""

    def __init__(self, settings: Settings, log_file: Path) -> None:
        self.settings = settings
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """Root URL of the worker's web server."""
        return f"http://127.0.0.1:{self.settings.web_port}"

    def start(self) -> WorkerProcess:
        """Start the child process; its output goes to ``log_file``."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.info("starting worker web=%s log=%s", self.base_url, self.log_file)
        with self.log_file.open("wb") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sec_online.cli", "worker"],
                env=worker_env(self.settings),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def check_alive(self, step: str) -> None:
        """Raise if the process has exited, naming the step and the log file."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise WorkerProcessError(
                f"the worker exited with code {code} while {step}; see {self.log_file}"
            )

    def get(self, path: str, timeout_s: float = 10.0) -> Any:
        """GET one of the worker's JSON pages."""
        with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:
            return json.load(response)

    def wait_healthy(self, timeout_s: float = 180.0) -> None:
        """Wait until the worker's web server responds to ``/health/``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive("starting")
            try:
                self.get("/health/", timeout_s=2.0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(POLL_SECONDS)
        raise WorkerProcessError(
            f"the worker's web server at {self.base_url} did not respond within {timeout_s:.0f} s"
        )

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """Stop with SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        process = self.process
        if process is None or process.poll() is not None:
            return None if process is None else process.returncode
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("worker did not stop within %.0f s, killing it", timeout_s)
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait()


def missing_work(stats: dict[str, Any], impressions: int, returns: int) -> list[str]:
    """What the worker has not done yet of a replay of ``impressions`` and ``returns``.

    Empty when every event was consumed, every emitted sample trained on, and the newest policy
    update that includes all of them is the one the worker serves.
    """
    consumed = stats.get("consumed", {})
    trainer = stats.get("trainer", {})
    policy = stats.get("policy", {})
    missing = []
    for kind, published in (("impressions", impressions), ("returns", returns)):
        if consumed.get(kind, 0) < published:
            missing.append(f"{kind} consumed {consumed.get(kind, 0)}/{published}")
    trained = trainer.get("samples_consumed", 0) + trainer.get("invalid_samples", 0)
    emitted = stats.get("samples_emitted", 0)
    if trained < emitted:
        missing.append(f"samples trained {trained}/{emitted}")
    elif trainer.get("published_samples_consumed", 0) < trainer.get("samples_consumed", 0):
        missing.append("final policy update not yet published")
    elif policy.get("version", 0) < trainer.get("version", 0):
        missing.append(f"serving version {policy.get('version')} < {trainer.get('version')}")
    return missing


def wait_processed(
    worker: WorkerProcess, impressions: int, returns: int, timeout_s: float
) -> dict[str, Any]:
    """Poll ``/stats/`` until ``missing_work`` is empty; returns ``/stats/?exact=1``."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, Any] = {}
    last_log = 0.0
    while time.monotonic() < deadline:
        worker.check_alive("processing the replay")
        stats = worker.get("/stats/")
        missing = missing_work(stats, impressions, returns)
        if not missing:
            return worker.get("/stats/?exact=1", timeout_s=120.0)
        if time.monotonic() - last_log > 10.0:
            logger.info("waiting for the worker: %s", "; ".join(missing))
            last_log = time.monotonic()
        time.sleep(POLL_SECONDS)
    missing = missing_work(stats, impressions, returns)
    raise WorkerProcessError(
        f"the worker did not finish within {timeout_s:.0f} s: {'; '.join(missing)}"
    )
