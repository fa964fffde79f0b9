"""Log lines: text and JSON formats, the ids passed with ``extra=``, and a worker's JSON log."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import pytest

from sec_online.logs import JsonFormatter, StaticIds, TextFormatter, logging_config
from sec_online.settings import Settings
from sec_online.workerproc import WorkerProcess


def emit(formatter: logging.Formatter, **extra: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(StaticIds({"worker": "app@127.0.0.1:1"}))
    log = logging.getLogger("sec_online.test_logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("dead-lettered record", extra=extra)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    return stream.getvalue().strip()


def test_json_line_fields():
    line = json.loads(emit(JsonFormatter(), topic="impressions", partition=2, offset=41))
    assert line["level"] == "WARNING"
    assert line["component"] == "sec_online.test_logs"
    assert line["message"] == "dead-lettered record"
    assert line["topic"] == "impressions"
    assert line["partition"] == 2
    assert line["offset"] == 41
    assert line["worker"] == "app@127.0.0.1:1"
    assert line["time"].endswith("Z")


def test_text_line_appends_ids():
    text = emit(TextFormatter(), user_id=7)
    assert " WARNING sec_online.test_logs: dead-lettered record [" in text
    assert text.endswith("[user_id=7 worker=app@127.0.0.1:1]")


def test_json_traceback_kept():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("sec_online.test_logs.traceback")
    log.addHandler(handler)
    log.propagate = False
    try:
        raise ValueError("bad value 3")
    except ValueError:
        log.exception("failed")
    finally:
        log.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert "ValueError: bad value 3" in line["traceback"]


def test_unknown_format_rejected():
    with pytest.raises(ValueError, match="invalid log format 'xml'"):
        logging_config("INFO", "xml")


def test_worker_writes_json_lines(
    kafka_bootstrap, kuairand_dir, topic_prefix, free_ports, tmp_path
):
    (port,) = free_ports(1)
    settings = dataclasses.replace(
        Settings.from_env(),
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=topic_prefix,
        app_id=f"{topic_prefix}logs",
        web_port=port,
        work_dir=tmp_path / "work",
        log_format="json",
        data_dir=kuairand_dir,
        partitions=1,
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    worker.start()
    try:
        worker.wait_healthy(timeout_s=120)
    finally:
        assert worker.stop() == 0
    lines = worker.log_file.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) > 5
    components = {record["component"] for record in records}
    assert "sec_online.runtime" in components
    assert all(record["worker"] == f"{settings.app_id}@127.0.0.1:{port}" for record in records)
