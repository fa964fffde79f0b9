"""The evaluation command end to end on recorded topics: exact repeat and report files."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from sec_online.data import find_logs
from sec_online.evaluation.run import EvalConfig, evaluate
from sec_online.replay import replay
from sec_online.runtime import create_topics
from sec_online.settings import Settings

USERS_IN_SLICE = 300
CONFIG = EvalConfig(
    seeds=(0, 1),
    users=40,
    horizon_days=4,
    methods=("random", "popular", "sec", "sec_no_entropy", "sec_continuous"),
    simulator_epochs=2,
    cloning_epochs=1,
)


@pytest.fixture(scope="module")
def recorded(kuairand_dir, kafka_bootstrap, tmp_path_factory):
    """Topics holding every row of USERS_IN_SLICE active users over the ten days."""
    root = tmp_path_factory.mktemp("evaluate")
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t-evaluate-{root.name}-",
        work_dir=root / "work",
        reports_dir=root / "first",
    )
    log = pd.read_csv(find_logs(settings.require_data_dir())[0])
    per_user = log.groupby("user_id").size()
    chosen = per_user[per_user >= 20].sort_index().index[:USERS_IN_SLICE]
    path = root / "log_standard_slice.csv.gz"
    log[log["user_id"].isin(chosen)].to_csv(path, index=False)
    create_topics(settings)
    replay(settings, [path], progress=False)
    return settings


@pytest.fixture(scope="module")
def two_runs(recorded):
    first = evaluate(recorded, CONFIG)
    second_settings = dataclasses.replace(recorded, reports_dir=recorded.reports_dir.parent / "2")
    second = evaluate(second_settings, CONFIG)
    return recorded, first, second


def test_same_topics_same_numbers(two_runs):
    _, first, second = two_runs
    assert first["methods"] == second["methods"]
    assert first["simulator_validation"] == second["simulator_validation"]


def test_offsets_in_report(two_runs):
    settings, first, second = two_runs
    assert first["topic_offsets"] == second["topic_offsets"]
    impressions = first["topic_offsets"][settings.topic("impressions")]
    assert sum(end - start for start, end in impressions.values()) == first["recorded"]["rows"]


def test_report_files(two_runs):
    settings, first, _ = two_runs
    folder = settings.reports_dir / "eval"
    table = json.loads((folder / "table.json").read_text())
    assert set(table["methods"]) == set(CONFIG.methods)
    for method in CONFIG.methods:
        row = table["methods"][method]
        assert row["seeds"] == [0, 1]
        assert set(row["return_time"]) == {"mean", "std", "values"}
    markdown = (folder / "table.md").read_text()
    assert "| sec | discrete |" in markdown
    assert (folder / "return_time.png").read_bytes().startswith(b"\x89PNG")
    assert (folder / "return_gaps.png").exists()


def test_sec_reports_selection(two_runs):
    _, first, _ = two_runs
    shares = first["methods"]["sec"]["level_selected"]
    assert sum(shares.values()) == pytest.approx(1.0)
