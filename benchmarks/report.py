"""The benchmark report: machine description, target checks, ``bench.json`` and ``bench.md``."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Targets of the product, checked against each run.
TARGETS = {
    "pipeline_ratio": (">=", 0.5),
    "freshness_p99_s": ("<", 5.0),
    "serving_inprocess_p99_ms": ("<", 2.0),
}
# Keys every report has; tests check them.
REQUIRED_KEYS = (
    "raw_consume_eps",
    "raw_produce_eps",
    "pipeline_eps",
    "pipeline_steady_eps",
    "pipeline_ratio",
    "stages",
    "freshness_input_eps",
    "freshness_p50_s",
    "freshness_p99_s",
    "freshness_breaks_at_eps",
    "trainer_samples_per_s",
    "serving_inprocess_p50_ms",
    "serving_inprocess_p99_ms",
    "serving_http_p50_ms",
    "serving_http_p99_ms",
    "state_bytes_per_user",
    "scaling",
    "machine",
    "targets",
)


def machine_info() -> dict[str, Any]:
    """Cores, memory, CPU model, load and versions of the machine the benchmark runs on."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "load_average_1m_5m_15m": list(os.getloadavg()),
    }
    for package in ("torch", "faust-streaming", "aiokafka", "rocksdict"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    info["cpu_model"] = _proc_field("/proc/cpuinfo", "model name")
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    info["ram_gb"] = round(int(mem_kb.split()[0]) / 2**20, 1) if mem_kb else None
    return info


def _proc_field(path: str, name: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        return None
    return None


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Check each target against the report. A missing figure counts as not met."""
    checks = {}
    for key, (op, bound) in TARGETS.items():
        value = report.get(key)
        met = value is not None and (value >= bound if op == ">=" else value < bound)
        checks[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    return checks


def write_reports(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write ``bench.json`` and ``bench.md`` into ``folder``; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "bench.json"
    md_path = folder / "bench.md"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _met(report: dict[str, Any], key: str) -> str:
    check = report["targets"].get(key)
    if check is None:
        return ""
    return f"{check['target']}: {'met' if check['met'] else 'not met'}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: the main table, then stages, freshness steps and the profile."""
    m = report["machine"]
    state = report["state_bytes_per_user"]
    scaling = report["scaling"]
    rows = [
        ("raw_produce_eps", _fmt(report["raw_produce_eps"], 0), "records/s, aiokafka, acks=all"),
        ("raw_consume_eps", _fmt(report["raw_consume_eps"], 0), "records/s, impressions topic"),
        ("pipeline_eps", _fmt(report["pipeline_eps"], 0), "events/s through 1 worker"),
        (
            "pipeline_steady_eps",
            _fmt(report["pipeline_steady_eps"], 0),
            "second half of the events only",
        ),
        ("pipeline_ratio", _fmt(report["pipeline_ratio"], 3), _met(report, "pipeline_ratio")),
        (
            "worker CPU per event",
            _fmt(report["pipeline"]["worker_cpu_us_per_event"], 0),
            f"µs; the worker used {_fmt(100 * report['pipeline']['worker_cpu_share'], 0)}% of "
            "one core meanwhile",
        ),
        ("freshness_input_eps", _fmt(report["freshness_input_eps"], 0), "steady input rate"),
        ("freshness_p50_s", _fmt(report["freshness_p50_s"], 2), ""),
        ("freshness_p99_s", _fmt(report["freshness_p99_s"], 2), _met(report, "freshness_p99_s")),
        (
            "freshness_breaks_at_eps",
            _fmt(report["freshness_breaks_at_eps"], 0),
            "lowest failing step",
        ),
        ("trainer_samples_per_s", _fmt(report["trainer_samples_per_s"], 0), "in-process"),
        ("serving_inprocess_p50_ms", _fmt(report["serving_inprocess_p50_ms"], 3), ""),
        (
            "serving_inprocess_p99_ms",
            _fmt(report["serving_inprocess_p99_ms"], 3),
            _met(report, "serving_inprocess_p99_ms"),
        ),
        (
            "serving_http_p50_ms",
            _fmt(report["serving_http_p50_ms"], 2),
            report["serving_http_note"],
        ),
        ("serving_http_p99_ms", _fmt(report["serving_http_p99_ms"], 2), ""),
        (
            "state disk, MB per million users",
            _fmt(state["disk_mb_per_million_users"], 0),
            f"RocksDB, synthetic {state['synthetic_users']:,} users",
        ),
        (
            "state memory, MB per million users",
            _fmt(state["memory_mb_per_million_users"], 0),
            "as Python dicts (estimate)",
        ),
        ("scaling, 1 worker", _fmt(scaling["workers_1_eps"], 0), "events/s"),
        ("scaling, 1 worker steady", _fmt(scaling["workers_1_steady_eps"], 0), "second half"),
        ("scaling, 2 workers", _fmt(scaling["workers_2_eps"], 0), "events/s, same events"),
        ("scaling, 2 workers steady", _fmt(scaling["workers_2_steady_eps"], 0), "second half"),
    ]
    lines = [
        "# sec-online benchmark",
        "",
        f"Run {report['started_utc']} in {report['mode']} mode: {report['events']:,} events "
        f"({report['pipeline_events']:,} for throughput, the rest for freshness). "
        f"Machine: {m['cores']} cores, {m['ram_gb']} GB RAM, {m['cpu_model']}, "
        f"Python {m['python']}, torch {m['torch']}. Load average at start "
        f"{_fmt(m['load_average_1m_5m_15m'][0], 2)}, at end {_fmt(report['load_average_end'], 2)}.",
        "",
        "| figure | value | note |",
        "|---|---:|---|",
        *(f"| {name} | {value} | {note} |" for name, value, note in rows),
        "",
        *_stage_lines(report),
        *_freshness_lines(report),
        *_profile_lines(report),
    ]
    return "\n".join(lines) + "\n"


def _stage_lines(report: dict[str, Any]) -> list[str]:
    stages = report["stages"]
    lines = [
        "## Stages, in-process on the same records",
        "",
        "| stage | us per event |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {_fmt(value, 2)} |" for name, value in stages["per_event_us"].items()]
    lines += [
        "",
        f"Sum of the stages: a ceiling of {_fmt(stages['ceiling_eps'], 0)} events/s for one "
        f"process, against {_fmt(report['pipeline_eps'], 0)} measured through the worker.",
        "",
    ]
    return lines


def _freshness_lines(report: dict[str, Any]) -> list[str]:
    fresh = report["freshness"]
    lines = [
        "## Freshness steps",
        "",
        f"Trainer publishes every {fresh['publish_every_samples']} samples or "
        f"{fresh['publish_every_seconds']} s. Censored: no covering update before the timeout, "
        "counted with the time waited (a lower bound).",
        "",
        "| input ev/s | achieved | worker ev/s | keeps up | samples | censored | p50 s | p99 s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for step in fresh["steps"]:
        lines.append(
            f"| {_fmt(step['input_eps'], 0)} | {_fmt(step['achieved_input_eps'], 0)} | "
            f"{_fmt(step['worker_eps_during_step'], 0)} | {step['keeps_up']} | "
            f"{step['samples']} | {step['censored']} | {_fmt(step['p50_s'], 2)} | "
            f"{_fmt(step['p99_s'], 2)} |"
        )
    return [*lines, ""]


def _profile_lines(report: dict[str, Any]) -> list[str]:
    profile = report.get("profile")
    if not profile or not profile.get("samples"):
        return ["## Profile", "", "No py-spy profile in this run (pass --py-spy PATH).", ""]
    lines = [
        "## Profile of the worker (py-spy)",
        "",
        f"{profile['samples']} samples over {profile['seconds']} s of the 1-worker run.",
        "",
        "| stage | inclusive % |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {_fmt(v, 1)} |" for k, v in profile["stages_inclusive_pct"].items()]
    lines += ["", "| function (own time) | % |", "|---|---:|"]
    lines += [f"| `{row['function']}` | {_fmt(row['pct'], 1)} |" for row in profile["own"]]
    return [*lines, ""]
