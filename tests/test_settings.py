"""Settings: defaults, the TOML file, environment variables, their precedence and errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sec_online.cli import main
from sec_online.settings import Settings, SettingsError, describe, describe_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file_or_env():
    settings, sources = Settings.load({})
    assert settings.partitions == 4
    assert settings.levels == 3
    assert set(sources.values()) == {"default"}


def test_file_overrides_defaults(tmp_path):
    config = write(tmp_path / "s.toml", 'partitions = 8\ntopic_prefix = "staging."\n')
    settings, sources = Settings.load({"SEC_CONFIG_FILE": str(config)})
    assert settings.partitions == 8
    assert settings.topic_prefix == "staging."
    assert sources["partitions"] == str(config)
    assert sources["levels"] == "default"


def test_env_overrides_file(tmp_path):
    config = write(tmp_path / "s.toml", "partitions = 8\nlevels = 2\n")
    settings, sources = Settings.load({"SEC_PARTITIONS": "6"}, config_file=config)
    assert settings.partitions == 6
    assert sources["partitions"] == "env"
    assert settings.levels == 2


def test_file_types_checked(tmp_path):
    config = write(tmp_path / "s.toml", 'partitions = "8"\n')
    with pytest.raises(SettingsError, match="invalid value '8' for partitions"):
        Settings.load({}, config_file=config)


def test_file_bool_not_an_int(tmp_path):
    config = write(tmp_path / "s.toml", "levels = true\n")
    with pytest.raises(SettingsError, match="expected int"):
        Settings.load({}, config_file=config)


def test_file_int_accepted_as_float(tmp_path):
    config = write(tmp_path / "s.toml", "publish_every_seconds = 5\n")
    settings, _ = Settings.load({}, config_file=config)
    assert settings.publish_every_seconds == 5.0
    assert isinstance(settings.publish_every_seconds, float)


def test_file_path_values(tmp_path):
    config = write(tmp_path / "s.toml", f'work_dir = "{tmp_path}"\ndata_dir = ""\n')
    settings, _ = Settings.load({}, config_file=config)
    assert settings.work_dir == tmp_path
    assert settings.data_dir is None


def test_unknown_key_named(tmp_path):
    config = write(tmp_path / "s.toml", "partitons = 8\n")
    with pytest.raises(SettingsError, match="unknown setting 'partitons'"):
        Settings.load({}, config_file=config)


def test_missing_file_named(tmp_path):
    missing = tmp_path / "absent.toml"
    with pytest.raises(SettingsError, match="settings file not found"):
        Settings.load({"SEC_CONFIG_FILE": str(missing)})


def test_broken_toml_named(tmp_path):
    config = write(tmp_path / "s.toml", "partitions = \n")
    with pytest.raises(SettingsError, match="cannot read settings file"):
        Settings.load({}, config_file=config)


def test_file_values_validated(tmp_path):
    config = write(tmp_path / "s.toml", "score_decay = 1.5\n")
    with pytest.raises(SettingsError, match="SEC_SCORE_DECAY"):
        Settings.load({}, config_file=config)


def test_non_finite_float_rejected():
    with pytest.raises(SettingsError, match="not a finite number"):
        Settings.load({"SEC_LEARNING_RATE": "nan"})


def test_every_setting_described():
    rows = describe()
    assert [row["name"] for row in rows] == list(Settings().public_dict())
    for row in rows:
        assert row["help"]
        assert row["env"] == "SEC_" + row["name"].upper()


def test_docs_table_matches_settings():
    text = DOCS.read_text(encoding="utf-8")
    assert text.endswith(describe_markdown())


def test_config_command_sources(tmp_path, capsys, monkeypatch):
    config = write(tmp_path / "s.toml", "clusters = 16\n")
    monkeypatch.setenv("SEC_SEED", "7")
    assert main(["--config", str(config), "config", "--sources"]) == 0
    printed = capsys.readouterr().out
    assert '"source": "env"' in printed
    assert f'"source": "{config}"' in printed


def test_config_command_bad_file(tmp_path, capsys):
    config = write(tmp_path / "s.toml", "clusters = 1\n")
    assert main(["--config", str(config), "config"]) == 2
    assert "SEC_CLUSTERS must be at least 2" in capsys.readouterr().err


def test_advertised_host_choices():
    assert Settings(web_host="127.0.0.1").advertised_host == "127.0.0.1"
    assert Settings(web_host="0.0.0.0").advertised_host == socket.gethostname()
    named = Settings(web_host="0.0.0.0", web_advertised_host="worker-2")
    assert named.advertised_host == "worker-2"
