"""The main job on a slice of the shipped log, against the session broker as an external one."""

from __future__ import annotations

import dataclasses
import json
import socket

import pytest

from sec_online.demo import run_demo
from sec_online.settings import Settings

SUMMARY_KEYS = {
    "impressions_in_log",
    "impressions_consumed",
    "returns_published",
    "users",
    "levels",
    "samples",
    "training_steps",
    "loss_first",
    "loss_last",
    "policy_versions_published",
    "selector",
    "dead_letters",
    "wall_seconds",
    "events_per_second",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo_run(kuairand_dir, kafka_bootstrap, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        reports_dir=root / "reports",
        work_dir=root / "work",
        web_port=free_port(),
        publish_every_samples=200,
        publish_every_seconds=1.0,
    )
    summary = run_demo(settings, limit=4000, timeout_s=300.0)
    return settings, summary


def test_summary_layout(demo_run):
    settings, summary = demo_run
    assert SUMMARY_KEYS <= summary.keys()
    written = json.loads((settings.reports_dir / "demo" / "summary.json").read_text())
    assert written["impressions_in_log"] == summary["impressions_in_log"]
    assert set(summary["levels"]) == {"0", "1", "2"}
    assert set(summary["selector"]) == {"0", "1", "2"}


def test_summary_counts(demo_run):
    _, summary = demo_run
    assert summary["impressions_in_log"] == 4000
    assert summary["impressions_consumed"] == 4000
    assert summary["returns_consumed"] == summary["returns_published"]
    assert summary["dead_letters"] == 0
    assert summary["samples"] > 0
    assert summary["training_steps"] > 0
    assert summary["policy_versions_published"] >= 1
    rated = sum(level["users"] for level in summary["levels"].values())
    assert rated + summary["unrated_users"] == summary["users"]


def test_plot_written(demo_run):
    settings, _ = demo_run
    png = (settings.reports_dir / "demo" / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert len(png) > 10_000
