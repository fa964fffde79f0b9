"""The live dashboard in headless Chromium, against a worker that replays the log in two parts.

Chromium is driven over the DevTools protocol with aiohttp's WebSocket client, so the test needs
no browser driver package. The browser may resolve no host name, and the test checks that the
page requested nothing outside the worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pandas as pd
import pytest
import torch

from sec_online.data import find_logs
from sec_online.policy import Policy
from sec_online.replay import load_slice, replay
from sec_online.runtime import create_topics
from sec_online.schemas import Sample
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from sec_online.userstate import UserStateMachine
from sec_online.workerproc import WorkerProcess, wait_processed
from streams.dashboard import TIMELINE_POINTS_SENT, dashboard_data, select_levels

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} not found: `make tools` installs Debian's chromium package",
)

USERS_IN_SLICE = 12
# Every flag keeps the browser off the network: only the worker on 127.0.0.1 is reachable.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1600",
]
BROWSER_START_TIMEOUT_S = 60.0
PAGE_TIMEOUT_S = 30.0
NUMBER_IDS = (
    "consumed-impressions",
    "consumed-returns",
    "samples-emitted",
    "dead-letters",
    "lag-total",
    "policy-version",
    "trainer-steps",
    "selection-users-total",
)


# Snapshot and selection, without a broker or a browser.


def _stats(timeline_points: int) -> dict[str, Any]:
    return {
        "uptime_seconds": 3.0,
        "consumed": {"impressions": 5},
        "applied": {"impressions": 5},
        "duplicates": {},
        "dead_letters_total": 0,
        "samples_emitted": 1,
        "last_event_ms": 9_000,
        "users_per_level": {"0": 2, "1": 1},
        "level_timeline": [{"event_ms": i, "levels": {"0": i}} for i in range(timeline_points)],
        "loss_timeline": [],
        "recommendations": {"0": 30, "1": 10},
        "recent_recommendations": {"0": 3, "1": 1},
        "trainer": {
            "active": True,
            "version": 1,
            "steps": 2,
            "last_loss": 1.0,
            "samples_per_second": 0.5,
            "samples_consumed": 1,
        },
        "policy": {"version": 1, "age_seconds": 4.0, "boundaries": [0.3, 0.7]},
        "consumer_lag": [
            {"topic": "t", "partition": 0, "end_offset": 5, "position": 3, "lag": 2},
            {"topic": "t", "partition": 1, "end_offset": None, "position": None, "lag": None},
        ],
    }


def test_data_appends_current_levels():
    data = dashboard_data(_stats(3), {"version": 1, "total": 0, "counts": {}, "shares": {}})
    assert data["level_timeline"][-1] == {"event_ms": 9_000, "levels": {"0": 2, "1": 1}}
    assert len(data["level_timeline"]) == 4
    assert data["consumer_lag_total"] == 2
    assert data["selection"]["recommendations"]["shares"] == {"0": 0.75, "1": 0.25}


def test_data_trims_timeline():
    data = dashboard_data(_stats(TIMELINE_POINTS_SENT * 2), {})
    timeline = data["level_timeline"]
    assert len(timeline) == TIMELINE_POINTS_SENT
    assert timeline[-2]["event_ms"] == TIMELINE_POINTS_SENT * 2 - 1


def test_data_without_events_has_no_now_point():
    stats = _stats(0)
    stats["last_event_ms"] = 0
    assert dashboard_data(stats, {})["level_timeline"] == []


@pytest.fixture(scope="module")
def machine() -> UserStateMachine:
    return UserStateMachine(8, lambda video: video % 8, 0.3)


@pytest.fixture(scope="module")
def policy(machine: UserStateMachine) -> Policy:
    return _trained_policy(machine, seed=3)


def _trained_policy(machine: UserStateMachine, seed: int) -> Policy:
    settings = dataclasses.replace(
        Settings.from_env(), data_dir=None, hidden_size=16, batch_size=16, seed=seed
    )
    trainer = Trainer(machine.n_features, machine.clusters, settings)
    rng = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(240):
        features = torch.randn(machine.n_features, generator=rng).tolist()
        level = index % settings.levels
        actions = [[(2 * level + int(features[0] > 0)) % machine.clusters, 2.0]]
        samples.append(
            Sample(
                event_id=f"e{index}",
                user_id=index,
                session_id=index,
                time_ms=index,
                features=features,
                actions=actions,
                level=level,
                retention_score=(level + 0.5) / settings.levels,
                gap_ms=1000,
            )
        )
    trainer.learn_many(samples)
    return Policy.from_update(trainer.make_update(1, 0))


def test_batch_selection_matches_serving(machine, policy):
    rng = torch.Generator().manual_seed(5)
    states = []
    for user_id in range(60):
        state = machine.new_state(user_id)
        state["level"] = None if user_id % 7 == 0 else user_id % 3
        history = state["history"]
        history["impressions"] = float(torch.randint(1, 50, (1,), generator=rng))
        history["sessions"] = float(torch.randint(1, 10, (1,), generator=rng))
        history["watch"] = history["impressions"] * float(torch.rand(1, generator=rng))
        history["clusters"] = torch.rand(8, generator=rng).tolist()
        states.append(state)
    expected: dict[str, int] = {}
    for state in states:
        level = policy.recommend(machine.features(state), machine.historical_level(state)).level
        expected[str(level)] = expected.get(str(level), 0) + 1
    assert dict(select_levels(policy, machine, states)) == expected
    assert sum(expected.values()) == len(states)
    # The selector picks several levels here, so the comparison covers more than a fallback.
    assert len(expected) > 1


def test_batch_selection_of_no_users(machine, policy):
    assert select_levels(policy, machine, []) == {}


# Headless Chromium against a worker.


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DevToolsPage:
    """One Chromium page driven over the DevTools protocol.

    Events that arrive while waiting for a command's response are kept: network requests in
    ``requests`` and uncaught script errors in ``exceptions``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, socket_url: str) -> None:
        self.loop = loop
        self.session, self.socket = loop.run_until_complete(_connect(socket_url))
        self.next_id = 0
        self.requests: list[str] = []
        self.exceptions: list[str] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result; raises on a protocol error."""
        return self.loop.run_until_complete(
            asyncio.wait_for(self._call(method, params), PAGE_TIMEOUT_S)
        )

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        command_id = self.next_id
        await self.socket.send_json({"id": command_id, "method": method, "params": params})
        while True:
            message = json.loads(await self.socket.receive_str())
            if message.get("id") == command_id:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method} failed: {message['error']}")
                return message["result"]
            self._record_event(message)

    def _record_event(self, message: dict[str, Any]) -> None:
        if message.get("method") == "Network.requestWillBeSent":
            self.requests.append(message["params"]["request"]["url"])
        elif message.get("method") == "Runtime.exceptionThrown":
            self.exceptions.append(json.dumps(message["params"]["exceptionDetails"]))

    def evaluate(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.loop.run_until_complete(self.socket.close())
        self.loop.run_until_complete(self.session.close())


class Browser:
    """Headless Chromium with a fresh profile, and its first page over DevTools."""

    def __init__(self, profile: Path, log_file: Path) -> None:
        self.profile = profile
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.loop = asyncio.new_event_loop()

    def start(self) -> DevToolsPage:
        """Start Chromium on about:blank and connect to that page."""
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        port = self._devtools_port()
        targets = self.loop.run_until_complete(_get_json(f"http://127.0.0.1:{port}/json/list"))
        pages = [t for t in targets if t["type"] == "page"]
        assert pages, f"Chromium has no page target: {targets}"
        return DevToolsPage(self.loop, pages[0]["webSocketDebuggerUrl"])

    def _devtools_port(self) -> int:
        # Chromium writes the port it picked for --remote-debugging-port=0 into this file.
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + BROWSER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Chromium exited with {self.process.returncode}; see {self.log_file}"
                )
            if active.exists() and active.read_text().strip():
                return int(active.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError(f"Chromium did not open DevTools within {BROWSER_START_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.loop.close()


async def _connect(socket_url: str) -> tuple[aiohttp.ClientSession, Any]:
    # The session must be created inside the running loop that later uses it.
    session = aiohttp.ClientSession()
    return session, await session.ws_connect(socket_url, max_msg_size=0)


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


@pytest.fixture(scope="module")
def slice_file(kuairand_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every row of USERS_IN_SLICE users with 30 to 200 rows each, as a gzip CSV."""
    log = pd.read_csv(find_logs(kuairand_dir)[0])
    per_user = log.groupby("user_id").size()
    chosen = per_user[(per_user >= 30) & (per_user <= 200)].sort_index().index[:USERS_IN_SLICE]
    path = tmp_path_factory.mktemp("dashboard-slice") / "log_standard_slice.csv.gz"
    log[log["user_id"].isin(chosen)].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def worker(kafka_bootstrap, tmp_path_factory) -> Iterator[WorkerProcess]:
    prefix = f"dashboard-{_free_port()}-"
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        app_id=prefix + "app",
        work_dir=tmp_path_factory.mktemp("dashboard-work"),
        web_port=_free_port(),
        partitions=2,
        publish_every_samples=50,
        publish_every_seconds=1.0,
    )
    create_topics(settings)
    process = WorkerProcess(settings, settings.work_dir / "worker.log").start()
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture
def page(tmp_path) -> Iterator[DevToolsPage]:
    browser = Browser(tmp_path / "chromium-profile", tmp_path / "chromium.log")
    devtools = browser.start()
    try:
        yield devtools
    finally:
        devtools.close()
        browser.stop()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _split_time(settings: Settings, slice_file: Path) -> int:
    """Event time (Unix ms) that splits the slice's impressions in two halves."""
    rows, _ = load_slice(settings, [slice_file])
    return int(rows["time_ms"].median())


def _displayed_numbers(page: DevToolsPage) -> dict[str, str]:
    ids = json.dumps(list(NUMBER_IDS))
    return page.evaluate(
        f"Object.fromEntries({ids}.map((id) => [id, document.getElementById(id)?.textContent]))"
    )


def _as_int(text: str) -> int:
    return int(text.replace(",", ""))


def _displayed_levels(page: DevToolsPage) -> dict[str, int]:
    rows = page.evaluate(
        "[...document.querySelectorAll('#levels-table tbody tr')]"
        ".map((row) => [row.dataset.level, row.cells[1].textContent])"
    )
    return {level: _as_int(text) for level, text in rows}


def _expected_numbers(stats: dict[str, Any], recent_users: int) -> dict[str, str]:
    lag = sum(row["lag"] or 0 for row in stats["consumer_lag"])
    return {
        "consumed-impressions": f"{stats['consumed'].get('impressions', 0):,}",
        "consumed-returns": f"{stats['consumed'].get('returns', 0):,}",
        "samples-emitted": f"{stats['samples_emitted']:,}",
        "dead-letters": f"{stats['dead_letters_total']:,}",
        "lag-total": f"{lag:,}",
        "policy-version": str(stats["policy"]["version"]),
        "trainer-steps": f"{stats['trainer']['steps']:,}",
        "selection-users-total": f"{recent_users:,}",
    }


def _wait_for_stats(page: DevToolsPage, worker: WorkerProcess) -> dict[str, str]:
    """Wait until the page shows what /stats/ shows; returns the numbers displayed.

    The worker is idle while this runs (its replay was processed), so the figures stop moving
    once the offsets are committed and the selection of recent users is computed again. Every
    user in the table changed recently, so the selection covers them all.
    """
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    displayed: dict[str, str] = {}
    expected: dict[str, str] = {}
    while time.monotonic() < deadline:
        stats = worker.get("/stats/?exact=1")
        expected = _expected_numbers(stats, stats["table"]["users"])
        displayed = _displayed_numbers(page)
        levels_match = _displayed_levels(page) == stats["users_per_level"]
        if displayed == expected and levels_match:
            return displayed
        time.sleep(0.5)
    location = page.evaluate("document.location.href")
    status = page.evaluate("document.getElementById('status')?.textContent")
    raise AssertionError(
        f"the page at {location} shows {displayed} (status {status!r}), /stats/ gives {expected}; "
        f"requests {page.requests}, script errors {page.exceptions}"
    )


@needs_chromium
def test_dashboard_shows_and_follows_stream(worker, slice_file, page):
    settings = worker.settings
    split_ms = _split_time(settings, slice_file)
    first = replay(settings, [slice_file], end_ms=split_ms, progress=False)
    wait_processed(worker, first.impressions, first.returns, 180.0)

    page.call("Network.enable")
    page.call("Runtime.enable")
    page.call("Page.navigate", url=worker.base_url + "/dashboard/")
    displayed_first = _wait_for_stats(page, worker)
    assert _as_int(displayed_first["consumed-impressions"]) == first.impressions
    assert _as_int(displayed_first["policy-version"]) >= 1
    # A marker that a reload would erase: the page must update in place.
    page.evaluate("window.loadedOnce = true")
    assert page.evaluate("document.querySelectorAll('#levels-chart polyline').length") >= 1
    assert page.evaluate("document.querySelectorAll('#loss-chart polyline').length") == 1
    assert page.evaluate("document.querySelectorAll('#selection-users .bar').length") >= 1
    lag_rows = page.evaluate("document.querySelectorAll('#lag-table tbody tr').length")
    assert lag_rows == 2 * settings.partitions
    refreshes = int(page.evaluate("document.body.dataset.refreshes"))

    second = replay(settings, [slice_file], start_ms=split_ms, progress=False)
    wait_processed(
        worker, first.impressions + second.impressions, first.returns + second.returns, 180.0
    )
    displayed_second = _wait_for_stats(page, worker)
    total = first.impressions + second.impressions
    assert _as_int(displayed_second["consumed-impressions"]) == total
    assert displayed_second["consumed-impressions"] != displayed_first["consumed-impressions"]
    assert page.evaluate("window.loadedOnce") is True
    assert int(page.evaluate("document.body.dataset.refreshes")) > refreshes
    assert page.evaluate("document.getElementById('status').textContent") == ""

    assert page.exceptions == []
    assert worker.base_url + "/dashboard/data/" in page.requests
    local = (worker.base_url + "/", "data:")
    outside = [url for url in page.requests if not url.startswith(local)]
    assert outside == []
