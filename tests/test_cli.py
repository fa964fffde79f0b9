"""Command line: settings output, error messages, and help for every subcommand."""

from __future__ import annotations

import json
import socket

import pytest

from sec_online.cli import main

SUBCOMMANDS = ["broker", "topics", "worker", "replay", "recommend", "demo", "config"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_config_prints_settings(capsys, monkeypatch):
    monkeypatch.setenv("SEC_LEVELS", "4")
    assert main(["config"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["levels"] == 4
    assert settings["partitions"] == 4


def test_invalid_setting_rejected(capsys, monkeypatch):
    monkeypatch.setenv("SEC_LEVELS", "three")
    assert main(["config"]) == 2
    error = capsys.readouterr().err
    assert "invalid value 'three' for SEC_LEVELS" in error


def test_recommend_without_worker(capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert main(["recommend", "7", "--url", url, "--timeout", "2"]) == 1
    error = capsys.readouterr().err
    assert f"no worker reachable at {url}" in error
    assert "sec-online worker" in error


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert command in capsys.readouterr().out


def test_broker_rejects_external_cluster(capsys, monkeypatch):
    monkeypatch.setenv("SEC_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert main(["broker", "status"]) == 2
    assert "external" in capsys.readouterr().err


def test_missing_data_folder_named(capsys, monkeypatch, tmp_path):
    missing = tmp_path / "absent"
    monkeypatch.setenv("SEC_DATA_DIR", str(missing))
    assert main(["replay"]) == 2
    assert f"data folder not found: SEC_DATA_DIR={missing}" in capsys.readouterr().err


def test_unknown_log_format_rejected(capsys, monkeypatch):
    monkeypatch.setenv("SEC_LOG_FORMAT", "xml")
    assert main(["config"]) == 2
    assert "SEC_LOG_FORMAT must be text or json" in capsys.readouterr().err
