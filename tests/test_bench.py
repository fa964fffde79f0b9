"""The benchmark: its helpers on fixed inputs, and a tiny run against the session broker.

The run checks that the report is complete and well formed, never how fast anything was.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaAdminClient

from sec_online.settings import PROJECT_ROOT

# The benchmarks package is not installed with the project, so import it from the checkout.
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import profiling  # noqa: E402
from benchmarks.freshness import _latencies, _Observed, breaking_rate  # noqa: E402
from benchmarks.report import REQUIRED_KEYS, check_targets  # noqa: E402

# Figures that a completed run always measures, so they must be finite and above zero.
POSITIVE_FIGURES = (
    "raw_consume_eps",
    "raw_produce_eps",
    "pipeline_eps",
    "pipeline_steady_eps",
    "pipeline_ratio",
    "freshness_input_eps",
    "freshness_p50_s",
    "freshness_p99_s",
    "trainer_samples_per_s",
    "serving_inprocess_p50_ms",
    "serving_inprocess_p99_ms",
    "serving_http_p50_ms",
    "serving_http_p99_ms",
)
STATE_FIGURES = (
    "value_bytes_per_user",
    "rocksdb_disk_bytes_per_user",
    "python_dict_bytes_per_user",
    "disk_mb_per_million_users",
    "memory_mb_per_million_users",
)
RUN_TIMEOUT_S = 420


def test_summarise_collapsed_stacks(tmp_path: Path) -> None:
    collapsed = tmp_path / "worker.pyspy"
    collapsed.write_text(
        "main (cli.py:1);plan_batch (/work/main/streams/processing.py:9);"
        "decode_impression (/work/main/sec_online/schemas.py:3) 30\n"
        "main (cli.py:1);learn_many (/work/main/sec_online/trainer.py:5) 10\n"
        "not a stack line\n"
    )
    summary = profiling.summarise(collapsed)
    assert summary["samples"] == 40
    assert summary["own"][0] == {
        "function": "decode_impression (sec_online/schemas.py)",
        "samples": 30,
        "pct": 75.0,
    }
    assert summary["stages_inclusive_pct"]["decode_validate"] == 75.0
    assert summary["stages_inclusive_pct"]["batch_processing"] == 75.0
    assert summary["stages_inclusive_pct"]["trainer"] == 25.0
    assert summary["inclusive"][0]["function"] == "main (cli.py)"
    assert summary["inclusive"][0]["pct"] == 100.0


def test_latencies_use_first_covering_update() -> None:
    observed = _Observed(
        sample_offsets={"r1": 0, "r2": 4, "r3": 9},
        update_samples_seen=[3, 5, 8],
        update_times_s=[100.0, 102.0, 104.0],
    )
    sent = {"r1": 99.0, "r2": 99.5, "r3": 99.0, "first-session": 99.0}
    latencies, censored = _latencies(sent, observed)
    # r1 is in the first update, r2 (offset 4) needs samples_seen >= 5, r3 in none yet.
    assert latencies[:2] == [1.0, 2.5]
    assert censored == 1
    assert len(latencies) == 3


def test_breaking_rate_is_first_failing_step() -> None:
    def step(rate: float, p99: float | None, keeps_up: bool = True) -> dict:
        return {"input_eps": rate, "p99_s": p99, "keeps_up": keeps_up, "censored": 0}

    assert breaking_rate([step(500, 1.0), step(1000, 2.0)]) is None
    assert breaking_rate([step(500, 1.0), step(1000, 6.0)]) == 1000.0
    assert breaking_rate([step(500, 1.0, keeps_up=False), step(1000, 2.0)]) == 500.0
    assert breaking_rate([step(500, None)]) == 500.0


def test_targets_met_and_missing() -> None:
    checks = check_targets(
        {"pipeline_ratio": 0.5, "freshness_p99_s": 5.0, "serving_inprocess_p99_ms": None}
    )
    assert checks["pipeline_ratio"]["met"] is True
    assert checks["freshness_p99_s"]["met"] is False
    assert checks["serving_inprocess_p99_ms"]["met"] is False


@pytest.fixture(scope="module")
def small_report(kafka_bootstrap: str, kuairand_dir: Path, tmp_path_factory) -> dict:
    """Run the benchmark on a tiny slice; returns bench.json and the report folder."""
    output = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env["SEC_DATA_DIR"] = str(kuairand_dir)
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--small",
        "--events=1500",
        "--freshness-rates=500",
        "--freshness-step-seconds=1",
        "--synthetic-users=1000",
        "--profile-seconds=1",
        f"--bootstrap-servers={kafka_bootstrap}",
        f"--output-dir={output}",
        f"--work-dir={output / 'work'}",
        "--no-progress",
    ]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the benchmark stop its worker processes and delete its topics.
        process.terminate()
        _, stderr = process.communicate(timeout=120)
        pytest.fail(f"the benchmark did not finish within {RUN_TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    report = json.loads((output / "bench.json").read_text())
    return {"report": report, "folder": output, "bootstrap": kafka_bootstrap}


def test_report_has_every_key(small_report: dict) -> None:
    report = small_report["report"]
    missing = [key for key in REQUIRED_KEYS if key not in report]
    assert missing == []


@pytest.mark.parametrize("key", POSITIVE_FIGURES)
def test_report_figure_positive(small_report: dict, key: str) -> None:
    value = small_report["report"][key]
    assert isinstance(value, int | float), f"{key}={value!r}"
    assert math.isfinite(value), f"{key}={value!r}"
    assert value > 0, f"{key}={value!r}"


def test_report_state_and_scaling(small_report: dict) -> None:
    report = small_report["report"]
    for key in STATE_FIGURES:
        value = report["state_bytes_per_user"][key]
        assert math.isfinite(value), f"{key}={value!r}"
        assert value > 0, f"{key}={value!r}"
    assert report["state_bytes_per_user"]["synthetic_users"] == 1000
    for key in ("workers_1_eps", "workers_2_eps", "speedup"):
        value = report["scaling"][key]
        assert math.isfinite(value), f"{key}={value!r}"
        assert value > 0, f"{key}={value!r}"


def test_report_stages_and_machine(small_report: dict) -> None:
    report = small_report["report"]
    per_event = report["stages"]["per_event_us"]
    assert set(per_event) >= {"decode_validate_us", "state_update_us", "rocksdb_get_put_us"}
    assert all(math.isfinite(v) and v > 0 for v in per_event.values()), per_event
    machine = report["machine"]
    assert machine["cores"] >= 1
    assert machine["python"].startswith("3.11")
    assert machine["torch"]
    assert report["mode"] == "small"


def test_report_targets_judged(small_report: dict) -> None:
    targets = small_report["report"]["targets"]
    assert set(targets) == {"pipeline_ratio", "freshness_p99_s", "serving_inprocess_p99_ms"}
    assert all(isinstance(check["met"], bool) for check in targets.values())


def test_markdown_table_written(small_report: dict) -> None:
    markdown = (small_report["folder"] / "bench.md").read_text()
    assert "| figure | value | note |" in markdown
    assert "| pipeline_ratio |" in markdown
    assert "## Freshness steps" in markdown
    assert markdown.count("met") >= 3


def test_benchmark_topics_deleted(small_report: dict) -> None:
    admin = KafkaAdminClient(bootstrap_servers=small_report["bootstrap"])
    try:
        left = [
            name for name in admin.list_topics() if name.startswith(("bench.", "sec-online-bench-"))
        ]
    finally:
        admin.close()
    assert left == []
