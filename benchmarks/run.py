"""Benchmark of sec-online on a real broker; writes ``bench.json`` and ``bench.md``.

Phases, each on its own topics (prefix ``bench.<phase>.``) and consumer group:

1. ``p1``: the throughput slice is produced with a bare producer (raw_produce_eps) and read
   back with a bare consumer (raw_consume_eps). Then one worker consumes it (pipeline_eps),
   optionally under py-spy. Once it is idle, a second process loads ``/recommend/`` over HTTP,
   and the rest of the log is sent at steady rates for freshness.
2. ``s2``: the same slice through two workers that share the partitions (scaling).
3. In-process: the worker's steps timed one by one on the same records, the trainer, the
   policy's serving call, and the state size of a synthetic user population.

Run ``python -m benchmarks.run --help`` for the options; ``make bench`` runs the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import freshness, inprocess, pipeline, profiling
from benchmarks.kafka_io import Record, consume_all, produce_all
from benchmarks.report import REQUIRED_KEYS, check_targets, machine_info, write_reports
from sec_online import topics
from sec_online.policy import Policy
from sec_online.replay import iter_events, load_slice
from sec_online.runtime import ensure_broker
from sec_online.schemas import Impression, encode, encode_key
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_RATES = (500.0, 1000.0, 2000.0, 5000.0)
SMALL_RATES = (250.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class Options:
    """Sizes of one run; ``--small`` shrinks every one of them."""

    events: int | None
    rates: tuple[float, ...]
    step_seconds: float
    synthetic_users: int
    http_requests: int
    http_concurrency: int
    serving_calls: int
    stage_events: int
    profile_seconds: int
    timeout_s: float


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command-line options; ``--help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="Benchmark sec-online on a Kafka broker."
    )
    parser.add_argument("--small", action="store_true", help="a quick run on about 6,000 events")
    parser.add_argument(
        "--events",
        type=int,
        help="events to use, as whole histories of the lowest user ids (default: the whole log)",
    )
    parser.add_argument(
        "--bootstrap-servers",
        help="external Kafka cluster host:port; default: the managed broker (SEC_BROKER_PORT)",
    )

    parser.add_argument("--output-dir", type=Path, help="report folder (default: reports/bench)")
    parser.add_argument(
        "--work-dir", type=Path, help="worker tables and logs (default: a temp folder)"
    )

    parser.add_argument(
        "--freshness-rates",
        help="ascending input rates in events/s for the freshness steps, comma-separated; "
        "the last is the rate reported as freshness_input_eps (default 500,1000,2000,5000)",
    )
    parser.add_argument(
        "--freshness-step-seconds", type=float, help="seconds of input per freshness step (8)"
    )

    parser.add_argument("--synthetic-users", type=int, help="users in the state-size population")
    parser.add_argument("--py-spy", help="py-spy executable; default: py-spy on PATH, if any")
    parser.add_argument("--profile-seconds", type=int, help="seconds of py-spy sampling (20)")
    parser.add_argument("--timeout", type=float, help="seconds allowed for each wait (1800)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def build_options(args: argparse.Namespace) -> Options:
    """Sizes from the command line, on top of the full or the ``--small`` defaults."""
    small = args.small
    rates = SMALL_RATES if small else DEFAULT_RATES
    if args.freshness_rates:
        rates = tuple(float(value) for value in args.freshness_rates.split(","))
    if list(rates) != sorted(rates) or min(rates) <= 0:
        raise SystemExit(f"--freshness-rates must be positive and ascending, got {rates}")
    events = args.events
    if events is None and small:
        events = 6_000
    if events is not None and events < 100:
        raise SystemExit(f"--events must be at least 100, got {events}")
    return Options(
        events=events,
        rates=rates,
        step_seconds=args.freshness_step_seconds or (2.0 if small else 8.0),
        synthetic_users=args.synthetic_users or (5_000 if small else 200_000),
        http_requests=300 if small else 3_000,
        http_concurrency=8 if small else 16,
        serving_calls=500 if small else inprocess.SERVING_CALLS,
        stage_events=6_000 if small else 60_000,
        profile_seconds=args.profile_seconds or (3 if small else 20),
        timeout_s=args.timeout or (300.0 if small else 1800.0),
    )


def load_events(settings: Settings, limit: int | None) -> list[tuple[bool, bytes, bytes, str]]:
    """Read the log's events in publish order as ``(is_return, key, value, event_id)``.

    With ``limit``, whole histories of the lowest user ids are kept up to ``limit`` events, so
    every kept return finds its user's earlier sessions, as in a full replay.
    """
    rows, returns = load_slice(settings)
    if limit is not None and limit < len(rows) + len(returns):
        counts = rows.groupby("user_id").size() + returns.groupby("user_id").size()
        cumulative = counts.sort_index().cumsum()
        users = cumulative.index[cumulative <= limit]
        rows = rows[rows["user_id"].isin(users)].reset_index(drop=True)
        returns = returns[returns["user_id"].isin(users)].reset_index(drop=True)
    return [
        (not isinstance(e, Impression), encode_key(e.user_id), encode(e), e.event_id)
        for e in iter_events(rows, returns)
    ]


def to_records(
    events: Sequence[tuple[bool, bytes, bytes, str]], settings: Settings
) -> list[Record]:
    """Records addressed to the topics of ``settings``."""
    impressions = settings.topic(topics.IMPRESSIONS)
    returns = settings.topic(topics.RETURNS)
    return [
        Record(returns if is_return else impressions, key, value, event_id, is_return)
        for is_return, key, value, event_id in events
    ]


def freshness_events(options: Options) -> int:
    """Events the freshness steps send in total."""
    return sum(int(rate * options.step_seconds) for rate in options.rates)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase and write the reports; returns the report."""
    options = build_options(args)
    progress = not args.no_progress and sys.stderr.isatty()
    settings = Settings.from_env()
    if args.bootstrap_servers:
        settings = dataclasses.replace(settings, bootstrap_servers=args.bootstrap_servers)
    settings.require_data_dir()

    output_dir = args.output_dir or settings.reports_dir / "bench"
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_info()

    events = load_events(settings, options.events)
    split = len(events) - freshness_events(options)
    if split < len(events) // 4:
        raise SystemExit(
            f"{len(events)} events leave too few for throughput after the freshness steps take "
            f"{freshness_events(options)}; use more --events or lower --freshness-rates"
        )
    logger.info("benchmark: %d events, %d for throughput", len(events), split)

    py_spy = args.py_spy or shutil.which("py-spy")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="sec-bench-"))
    broker = ensure_broker(settings)
    try:
        pipeline.delete_bench_topics(settings.bootstrap)
        report = _run_phases(settings, options, events, split, work_dir, py_spy, progress)
    finally:
        _clean_up(settings, broker, work_dir, keep=args.work_dir is not None)

    mode = "full" if options.events is None else "slice"
    report.update(
        started_utc=started_utc,
        mode="small" if args.small else mode,
        events=len(events),
        pipeline_events=split,
        machine=machine,
        load_average_end=os.getloadavg()[0],
        settings={k: v for k, v in settings.public_dict().items() if "dir" not in k},
    )
    report["targets"] = check_targets(report)

    missing = [key for key in REQUIRED_KEYS if key not in report]
    if missing:
        raise RuntimeError(f"benchmark report lacks {', '.join(missing)}")
    json_path, md_path = write_reports(report, output_dir)
    logger.info("wrote %s and %s", json_path, md_path)
    return report


def _clean_up(settings: Settings, broker: Any, work_dir: Path, keep: bool) -> None:
    try:
        pipeline.delete_bench_topics(settings.bootstrap)
    except Exception:  # noqa: BLE001 - cleanup goes on; the topics go at the next run
        logger.exception("could not delete the benchmark topics")
    if broker is not None:
        broker.stop()
    if not keep:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run_phases(
    settings: Settings,
    options: Options,
    events: list[tuple[bool, bytes, bytes, str]],
    split: int,
    work_dir: Path,
    py_spy: str | None,
    progress: bool,
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    p1 = pipeline.phase_settings(settings, "p1", work_dir)
    report.update(_phase_one(p1, options, events, split, work_dir, py_spy, progress))
    s2 = pipeline.phase_settings(settings, "s2", work_dir)
    scaling: dict[str, Any] = {
        "workers_1_eps": report["pipeline_eps"],
        "workers_1_steady_eps": report["pipeline_steady_eps"],
        "workers_2_eps": None,
        "workers_2_steady_eps": None,
        "speedup": None,
        "partitions": settings.partitions,
        "error": None,
    }
    try:
        two = _throughput(s2, 2, to_records(events[:split], s2), work_dir, options, progress)
    except TimeoutError as exc:
        # The other figures stay valid, and the report gives the reason this one is missing.
        logger.error("the 2-worker run failed: %s", exc)
        scaling["error"] = str(exc)
    else:
        scaling["workers_2_eps"] = two["events_per_second"]
        scaling["workers_2_steady_eps"] = two["steady_events_per_second"]
        scaling["speedup"] = two["events_per_second"] / report["pipeline_eps"]
    report["scaling"] = scaling
    report.update(_in_process(settings, options, events[:split], work_dir, progress))
    return report


def _throughput(
    settings: Settings,
    workers: int,
    records: list[Record],
    work_dir: Path,
    options: Options,
    progress: bool,
) -> dict[str, Any]:
    """Produce ``records`` to fresh topics, then time ``workers`` workers consuming them."""
    group = pipeline.WorkerGroup(settings, workers, work_dir / "logs")
    asyncio.run(produce_all(settings.bootstrap, records, progress))
    try:
        group.start()
        return pipeline.time_consumption(group, len(records), options.timeout_s, progress)
    finally:
        group.stop()


def _phase_one(
    settings: Settings,
    options: Options,
    events: list[tuple[bool, bytes, bytes, str]],
    split: int,
    work_dir: Path,
    py_spy: str | None,
    progress: bool,
) -> dict[str, Any]:
    records = to_records(events, settings)
    throughput, fresh = records[:split], records[split:]
    group = pipeline.WorkerGroup(settings, 1, work_dir / "logs")
    produce_s = asyncio.run(produce_all(settings.bootstrap, throughput, progress))
    impressions = sum(not r.is_return for r in throughput)
    consumed, consume_s = asyncio.run(
        consume_all(
            settings.bootstrap, settings.topic(topics.IMPRESSIONS), settings.partitions, progress
        )
    )
    if consumed != impressions:
        raise RuntimeError(f"raw consumer read {consumed} impressions, {impressions} were produced")
    result: dict[str, Any] = {
        "raw_produce_eps": len(throughput) / produce_s,
        "raw_consume_eps": consumed / consume_s,
    }
    try:
        group.start()
        profile = _start_profile(
            group, py_spy, options.profile_seconds, len(throughput) // 5, work_dir
        )
        timed = pipeline.time_consumption(group, len(throughput), options.timeout_s, progress)
        stats = pipeline.wait_idle(group, len(throughput), options.timeout_s)
        result.update(_after_pipeline(settings, group, timed, stats, profile))
        result["pipeline_ratio"] = result["pipeline_eps"] / result["raw_consume_eps"]
        result.update(_http_serving(group, throughput, options))
        fresh_result = asyncio.run(
            freshness.measure_freshness(
                settings, group, fresh, options.rates, options.step_seconds, options.timeout_s
            )
        )
    finally:
        group.stop()
    result.update(_freshness_figures(fresh_result))
    return result


def _start_profile(
    group: pipeline.WorkerGroup, py_spy: str | None, seconds: int, start_after: int, work_dir: Path
) -> dict[str, Any]:
    """Start py-spy once the worker consumed ``start_after`` events; fills the dict when done."""
    profile: dict[str, Any] = {"seconds": seconds, "started_after_events": start_after}
    if py_spy is None:
        logger.warning("py-spy not found: no profile of the worker (pass --py-spy PATH)")
        return profile

    def sample() -> None:
        # Skip the start-up, which the profile would otherwise be mostly about.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and group.consumed() < start_after:
            time.sleep(pipeline.POLL_S)
        output = profiling.record(py_spy, group.pids()[0], seconds, work_dir / "worker.pyspy")
        if output is not None:
            shutil.copy(output, work_dir / "logs" / "worker.pyspy")
            profile.update(profiling.summarise(output))

    thread = threading.Thread(target=sample, name="py-spy", daemon=True)
    thread.start()
    profile["_thread"] = thread
    return profile


def _after_pipeline(
    settings: Settings,
    group: pipeline.WorkerGroup,
    timed: dict[str, Any],
    stats: list[dict[str, Any]],
    profile: dict[str, Any],
) -> dict[str, Any]:
    thread = profile.pop("_thread", None)
    if thread is not None:
        thread.join()
    worker = group.workers[0]
    exact = worker.get("/stats/?exact=1", timeout_s=120.0)
    table_dir = settings.work_dir / "faust" / f"worker-{settings.web_port}"
    users = exact["table"]["users"]
    return {
        "pipeline_eps": timed["events_per_second"],
        "pipeline_steady_eps": timed["steady_events_per_second"],
        "pipeline": {
            **timed,
            "samples_emitted": stats[0]["samples_emitted"],
            "dead_letters": stats[0]["dead_letters_total"],
            "users": users,
            "worker_rss_bytes": pipeline.rss_bytes(group.pids()[0]),
            "table_folder_bytes": pipeline.folder_bytes(table_dir),
            "table_folder_bytes_per_user": pipeline.folder_bytes(table_dir) / max(users, 1),
        },
        "profile": profile,
    }


def _http_serving(
    group: pipeline.WorkerGroup, records: list[Record], options: Options
) -> dict[str, Any]:
    users = sorted({int(r.key) for r in records})[:2000]
    command = [
        sys.executable,
        "-m",
        "benchmarks.http_load",
        "--base-url",
        group.workers[0].base_url,
        "--user-ids",
        ",".join(map(str, users)),
        "--requests",
        str(options.http_requests),
        "--concurrency",
        str(options.http_concurrency),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"HTTP load process failed with code {done.returncode}: {done.stderr}")
    result = json.loads(done.stdout)
    if result["ok"] == 0:
        raise RuntimeError(
            f"every /recommend/ request failed: {result['errors']}; see the worker log"
        )
    return {
        "serving_http_p50_ms": result["p50_ms"],
        "serving_http_p99_ms": result["p99_ms"],
        "serving_http": result,
        "serving_http_note": (
            f"{result['concurrency']} concurrent, {result['requests']} requests, idle worker"
        ),
    }


def _freshness_figures(result: dict[str, Any]) -> dict[str, Any]:
    steps = result["steps"]
    last = steps[-1] if steps else {}
    return {
        "freshness": result,
        "freshness_input_eps": last.get("input_eps"),
        "freshness_p50_s": last.get("p50_s"),
        "freshness_p99_s": last.get("p99_s"),
        "freshness_breaks_at_eps": freshness.breaking_rate(steps),
    }


def _in_process(
    settings: Settings,
    options: Options,
    events: list[tuple[bool, bytes, bytes, str]],
    work_dir: Path,
    progress: bool,
) -> dict[str, Any]:
    records = to_records(events[: options.stage_events], settings)
    stages = inprocess.time_stages(settings, records, work_dir)
    machine = stages.pop("_machine")
    states = stages.pop("_states")
    samples = stages.pop("_samples")
    trainer = inprocess.time_trainer(settings, machine.n_features, samples)
    policy = Policy.from_update(trainer.pop("_update"))
    serving = inprocess.time_serving(machine, policy, states, options.serving_calls)
    state = inprocess.measure_state_size(states, options.synthetic_users, work_dir, progress)
    return {
        "stages": stages,
        "trainer": trainer,
        "trainer_samples_per_s": trainer["samples_per_second"],
        "serving_inprocess": serving,
        "serving_inprocess_p50_ms": serving["p50_ms"],
        "serving_inprocess_p99_ms": serving["p99_ms"],
        "state_bytes_per_user": state,
    }


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.run``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kafka-python logs every connection at INFO.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the workers and delete the topics.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    report = run(parse_args(argv))
    ratio = report["pipeline_ratio"]
    logger.info(
        "pipeline_ratio=%s", "n/a" if ratio is None or math.isnan(ratio) else f"{ratio:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
