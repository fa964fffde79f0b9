"""The main job: replay the KuaiRand log through a live worker and report what it learned.

Steps:
1. Start the managed broker unless SEC_BOOTSTRAP_SERVERS names a cluster.
2. Reset the demo's own topics (prefix ``demo.``) and work folder, then create the topics.
3. Start one worker process and wait until its HTTP server responds.
4. Replay the log as fast as possible.
5. Wait until the worker consumed every event and the trainer published a policy update that
   includes every sample.
6. Write ``summary.json`` and ``demo.png`` under ``reports/demo`` and stop what the demo started.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sec_online import topics
from sec_online.kafka_admin import delete_topics
from sec_online.replay import ReplayReport, replay
from sec_online.runtime import create_topics, ensure_broker
from sec_online.settings import Settings
from sec_online.workerproc import WorkerProcess, wait_processed

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo."
DEMO_APP_ID = "sec-online-demo"
# Steps in the moving average drawn over the per-step training loss.
LOSS_WINDOW = 50


def demo_settings(settings: Settings) -> Settings:
    """Settings of the demo run: its own topics, consumer group and work folder."""
    return dataclasses.replace(
        settings,
        topic_prefix=DEMO_PREFIX,
        app_id=DEMO_APP_ID,
        work_dir=settings.work_dir / "demo",
    )


def run_demo(
    settings: Settings,
    *,
    limit: int | None = None,
    timeout_s: float = 1800.0,
    keep_running: bool = False,
) -> dict[str, Any]:
    """Run the main job and return its summary, also written to ``reports/demo/summary.json``."""
    started = time.monotonic()
    settings = demo_settings(settings)
    settings.require_data_dir()
    report_dir = settings.reports_dir / "demo"
    report_dir.mkdir(parents=True, exist_ok=True)
    broker = ensure_broker(settings)
    worker = None
    try:
        _reset(settings)
        worker = WorkerProcess(settings, report_dir / "worker.log").start()
        worker.wait_healthy()
        replayed = replay(settings, limit=limit, progress=True)
        stats = wait_processed(worker, replayed.impressions, replayed.returns, timeout_s)
        example = _example_recommendation(worker, stats["table"].get("most_active_user"))
        summary = build_summary(settings, replayed, stats, example, time.monotonic() - started)
        summary["summary_file"] = str(report_dir / "summary.json")
        summary["plot_file"] = str(report_dir / "demo.png")
        (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_demo(stats, report_dir / "demo.png")
        logger.info("demo finished in %.1f s: %s", summary["wall_seconds"], report_dir)
        return summary
    finally:
        if not keep_running:
            if worker is not None:
                worker.stop()
            if broker is not None:
                broker.stop()


def _reset(settings: Settings) -> None:
    """Delete the demo's topics, including Faust's changelog topics, and its work folder."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="sec-online-demo")
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    stale = sorted(
        name
        for name in existing
        if name.startswith(settings.topic_prefix) or name.startswith(settings.app_id + "-")
    )
    if stale:
        logger.info("deleting topics of the previous demo run: %s", ", ".join(stale))
        delete_topics(settings.bootstrap, stale)
    if settings.work_dir.exists():
        shutil.rmtree(settings.work_dir)
    created = create_topics(settings)
    logger.info("created topics: %s", ", ".join(created))


def _example_recommendation(worker: WorkerProcess, user: int | None) -> dict[str, Any] | None:
    if user is None:
        return None
    try:
        return worker.get(f"/recommend/{user}/")
    except urllib.error.URLError as exc:
        logger.warning("example recommendation failed user_id=%s: %s", user, exc)
        return None


def build_summary(
    settings: Settings,
    replayed: ReplayReport,
    stats: dict[str, Any],
    example: dict[str, Any] | None,
    wall_seconds: float,
) -> dict[str, Any]:
    """Figures of the run, in the layout documented in the README."""
    table = stats["table"]
    policy = stats["policy"]
    boundaries = policy["boundaries"]
    selector = policy.get("selector") or {}
    loss = stats["loss_timeline"]
    events = replayed.impressions + replayed.returns
    return {
        "impressions_in_log": replayed.impressions,
        "impressions_consumed": stats["consumed"].get("impressions", 0),
        "impressions_applied": stats["applied"].get("impressions", 0),
        "returns_published": replayed.returns,
        "returns_consumed": stats["consumed"].get("returns", 0),
        "duplicates": stats["duplicates"],
        "users": table["users"],
        "levels": _levels(table["users_per_level"], boundaries, settings.levels),
        "unrated_users": table["users_per_level"].get("unrated", 0),
        "samples": stats["samples_emitted"],
        "training_steps": stats["trainer"]["steps"],
        "loss_first": loss[0]["loss"] if loss else None,
        "loss_last": loss[-1]["loss"] if loss else None,
        "policy_versions_published": stats["trainer"]["version"],
        "selector": _selector(selector, settings.levels),
        "dead_letters": stats["dead_letters_total"],
        "dead_letters_by_reason": stats["dead_letters"],
        "example_recommendation": example,
        "wall_seconds": round(wall_seconds, 1),
        "replay_seconds": round(replayed.seconds, 1),
        "events_per_second": round(events / wall_seconds, 1),
        "evaluation_report": _evaluation_report(settings),
        "settings": settings.public_dict(),
        "topics": {name: settings.topic(name) for name in _TOPIC_NAMES},
    }


_TOPIC_NAMES = (
    topics.IMPRESSIONS,
    topics.RETURNS,
    topics.SAMPLES,
    topics.POLICY_UPDATES,
    topics.DEAD_LETTERS,
)


def _evaluation_report(settings: Settings) -> dict[str, Any]:
    """Return where the offline evaluation writes its report, and whether one exists yet."""
    table = settings.reports_dir / "eval" / "table.md"
    return {
        "table": str(table),
        "exists": table.exists(),
        "how": "make eval (sec-online evaluate) replays the recorded topics into a simulator",
    }


def _levels(counts: dict[str, int], boundaries: list[float], levels: int) -> dict[str, Any]:
    """Users and lower score boundary of each level (level 0 starts at 0)."""
    lower = [0.0, *boundaries]
    return {str(k): {"users": counts.get(str(k), 0), "boundary": lower[k]} for k in range(levels)}


def _selector(selector: dict[str, Any], levels: int) -> dict[str, Any]:
    centroids = selector.get("centroids") or [[] for _ in range(levels)]
    deltas = selector.get("deltas") or [None] * levels
    return {str(k): {"centroids": centroids[k], "delta": deltas[k]} for k in range(levels)}


def plot_demo(stats: dict[str, Any], path: Path) -> None:
    """Plot the training loss and the users per level over replay (event) time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    loss = stats["loss_timeline"]
    if loss:
        times = [when(p["event_ms"]) for p in loss]
        values = [p["loss"] for p in loss]
        top.plot(times, values, lw=0.5, alpha=0.4, label="one step")
        smooth = _moving_average(values, LOSS_WINDOW)
        top.plot(times, smooth, lw=1.5, label=f"mean of {LOSS_WINDOW} steps")
        top.legend(loc="upper right")
    top.set_ylabel("training loss")
    top.set_title("SEC experts fine-tuned from the stream")
    timeline = stats["level_timeline"]
    keys = sorted({key for point in timeline for key in point["levels"]})
    for key in keys:
        label = "no rated return yet" if key == "unrated" else f"level {key}"
        bottom.plot(
            [when(p["event_ms"]) for p in timeline],
            [p["levels"].get(key, 0) for p in timeline],
            label=label,
        )
    bottom.set_ylabel("users")
    bottom.set_xlabel("replay time (UTC)")
    bottom.legend(loc="upper left")
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _moving_average(values: list[float], window: int) -> list[float]:
    """Mean of each value and up to ``window - 1`` values before it."""
    sums, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        sums.append(total / min(index + 1, window))
    return sums
