"""Trainer faults: a process killed while it writes checkpoints or publishes policy updates.

Three checks, each on real parts (a RocksDB folder, the broker, worker processes):

- ``kill_checkpoint_writer``: a child process saves checkpoints in a tight loop and is SIGKILLed
  at seeded moments. The reopened store must return a complete checkpoint whose bytes equal
  what the child wrote for that version, and not older than the last save the child reported.
- ``check_bad_updates``: truncated, altered, wrongly checksummed and unloadable policy updates
  published between good ones. The worker must reject each with a logged reason, keep serving
  the previous version and adopt the next good one.
- ``run_trainer_killed``: a worker SIGKILLed at seeded moments while its trainer learns and
  publishes. Every update on the topic must decode, versions must increase, the served version
  must never go backwards, and the restarted trainer must resume from its checkpoint's offset.

``python -m sec_online.trainerfaults write-checkpoints FOLDER SEED`` runs the child of the first
check.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

from sec_online import topics
from sec_online.kafka_admin import end_offsets, read_all
from sec_online.policy import InvalidPolicyUpdate, PolicyUpdate, decode_update, encode_update
from sec_online.reliability import (
    PacedPublisher,
    Record,
    kill,
    publish,
    reset_scenario,
    scenario_settings,
    start_worker,
)
from sec_online.schemas import Sample, encode
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from sec_online.userstate import feature_names
from sec_online.workerproc import WorkerProcess
from state.checkpoints import CheckpointStore

logger = logging.getLogger(__name__)

SCENARIO = "trainer_killed"
POLL_S = 0.25
STATS_TIMEOUT_S = 10.0
# Checkpoint blobs of the writer child vary between these sizes, so a kill can land inside a
# large write as well as between small ones.
MIN_BLOB_BYTES = 16 * 1024
MAX_BLOB_BYTES = 2 * 1024 * 1024
# Samples published in run_trainer_killed, their rate, and how often the trainer publishes.
KILLED_SAMPLES = 2_400
SAMPLE_RATE = 200.0
PUBLISH_EVERY_SAMPLES = 100
TRAINER_KILLS = 2
# Kills come after the trainer learned between these shares of the samples.
KILL_WINDOW = (0.2, 0.8)
RESTORED_LINE = re.compile(r"trainer restored version=(\d+) next_offset=(\w+) samples_seen=(\d+)")


class TrainerFaultError(RuntimeError):
    """A trainer fault check could not run to its end."""


# Checkpoints written by a process that is killed.
def expected_blob(seed: int, version: int) -> bytes:
    """Checkpoint bytes the writer child saves as ``version``; the same for the same seed."""
    rng = random.Random(f"{seed}-{version}")
    return rng.randbytes(rng.randint(MIN_BLOB_BYTES, MAX_BLOB_BYTES))


def write_checkpoints(folder: Path, seed: int) -> None:
    """Save checkpoints of increasing versions until killed, printing ``saved <version>``.

    A line is printed only after ``save`` returned, so a printed version is durable.
    """
    with CheckpointStore(folder) as store:
        latest = store.load_latest()
        version = 0 if latest is None else latest[0]
        while True:
            version += 1
            blob = expected_blob(seed, version)
            meta = {"version": version, "sha256": hashlib.sha256(blob).hexdigest()}
            store.save(version, blob, meta)
            store.prune(keep=3)
            print(f"saved {version}", flush=True)


def kill_checkpoint_writer(folder: Path, seed: int, kills: int) -> dict[str, Any]:
    """SIGKILL a checkpoint writer child ``kills`` times at seeded moments and check the store.

    Returns ``kills`` records of the version the child last reported, the version found after
    reopening and whether its bytes and metadata were complete, plus ``failures``.
    """
    rng = random.Random(seed)
    outcomes = []
    for _ in range(kills):
        reported = _run_and_kill(folder, seed, rng.uniform(0.05, 1.5))
        outcomes.append(_inspect_store(folder, seed, reported))
    failures = [failure for outcome in outcomes for failure in outcome["failures"]]
    return {"kills": outcomes, "failures": failures, "passed": not failures}


def _run_and_kill(folder: Path, seed: int, after_s: float) -> int:
    """Start the writer, wait for its first save, SIGKILL it ``after_s`` later.

    Returns the last version it reported as saved.
    """
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sec_online.trainerfaults",
            "write-checkpoints",
            str(folder),
            str(seed),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    reported: list[int] = []
    first = threading.Event()

    def read_lines() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            reported.append(int(line.split()[1]))
            first.set()

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    try:
        if not first.wait(timeout=60.0):
            raise TrainerFaultError(f"the checkpoint writer saved nothing within 60 s in {folder}")
        time.sleep(after_s)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30.0)
        reader.join(timeout=30.0)
    return reported[-1]


def _inspect_store(folder: Path, seed: int, reported: int) -> dict[str, Any]:
    with CheckpointStore(folder) as store:
        latest = store.load_latest()
        versions = store.versions()
    failures = []
    if latest is None:
        return {"reported": reported, "found": None, "failures": ["no checkpoint after the kill"]}
    version, blob, meta = latest
    # The child may have finished one more save without printing it before the kill.
    if not reported <= version <= reported + 1:
        failures.append(f"latest version {version}, last reported save {reported}")
    if blob != expected_blob(seed, version):
        failures.append(
            f"version {version} has {len(blob)} bytes that differ from the written ones"
        )
    if meta != {"version": version, "sha256": hashlib.sha256(blob).hexdigest()}:
        failures.append(f"version {version} has metadata {meta} of another checkpoint")
    if versions[-1] != version:
        failures.append(f"versions {versions} do not end with the latest {version}")
    return {"reported": reported, "found": version, "versions": versions, "failures": failures}


# Policy updates that must be rejected.
def make_update(settings: Settings, version: int, seed: int = 0) -> PolicyUpdate:
    """Train on seeded samples and return a valid policy update for a worker of ``settings``."""
    n_features = len(feature_names(settings.clusters))
    trainer = Trainer(n_features, settings.clusters, settings)
    trainer.learn_many(synthetic_samples(settings, 4 * settings.batch_size, seed))
    return trainer.make_update(version, int(time.time() * 1000))


def bad_update_records(update: PolicyUpdate) -> dict[str, tuple[bytes, str]]:
    """Broken variants of an encoded update, each with the reason the follower must give."""
    raw = encode_update(update)
    weights = bytearray(update.weights())
    weights[len(weights) // 2] ^= 0xFF
    altered = dataclasses.replace(update, weights_b64=base64.b64encode(weights).decode())
    foreign = b"these bytes are not a torch state_dict"
    unloadable = dataclasses.replace(
        update,
        weights_b64=base64.b64encode(foreign).decode(),
        sha256=hashlib.sha256(foreign).hexdigest(),
    )
    return {
        "truncated": (raw[: len(raw) // 2], "undecodable"),
        "altered_weights": (encode_update(altered), "checksum_mismatch"),
        "wrong_checksum": (
            encode_update(dataclasses.replace(update, sha256="0" * 64)),
            "checksum_mismatch",
        ),
        "unloadable_weights": (encode_update(unloadable), "invalid_weights"),
    }


def read_stats(worker: WorkerProcess) -> dict[str, Any] | None:
    """Read the worker's ``/stats/``, or return ``None`` when it did not respond in time.

    A worker busy with a restart or a loaded machine can miss one poll, so the callers poll
    again until their own deadline instead of failing.
    """
    try:
        return worker.get("/stats/", timeout_s=STATS_TIMEOUT_S)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        logger.warning("worker stats page did not respond url=%s: %s", worker.base_url, exc)
        return None


def wait_served(worker: WorkerProcess, version: int, invalid: int, timeout_s: float) -> dict:
    """Wait until the worker serves ``version`` and counted ``invalid`` invalid updates."""
    deadline = time.monotonic() + timeout_s
    policy: dict[str, Any] = {}
    while time.monotonic() < deadline:
        worker.check_alive("following policy updates")
        stats = read_stats(worker)
        policy = stats["policy"] if stats is not None else policy
        if policy.get("version") == version and policy.get("invalid_updates", -1) >= invalid:
            return policy
        time.sleep(POLL_S)
    raise TrainerFaultError(
        f"the worker serves version {policy.get('version')} with "
        f"{policy.get('invalid_updates')} invalid updates counted, expected version {version} "
        f"and {invalid}, after {timeout_s:.0f} s; see {worker.log_file}"
    )


def rejection_reasons(log_file: Path) -> list[str]:
    """Reasons of the policy updates the worker logged as rejected, in log order."""
    found = re.findall(r"rejected policy update offset=\S+ reason=(\w+)", log_file.read_text())
    return list(found)


# A worker killed while its trainer publishes.
def synthetic_samples(settings: Settings, count: int, seed: int) -> list[Sample]:
    """Build seeded samples shaped like the worker's: features, actions and levels of ``settings``.

    Features are uniform in [0, 1) as most real ones are rates and shares.
    """
    rng = random.Random(seed)
    n_features = len(feature_names(settings.clusters))
    samples = []
    for index in range(count):
        actions = {rng.randrange(settings.clusters): rng.randint(1, 4) for _ in range(3)}
        samples.append(
            Sample(
                event_id=f"synthetic:{seed}:{index}",
                user_id=index % 97,
                session_id=1_650_000_000_000 + index,
                time_ms=1_650_000_000_000 + index,
                features=[rng.random() for _ in range(n_features)],
                actions=[[cluster, float(weight)] for cluster, weight in sorted(actions.items())],
                level=rng.randrange(settings.levels),
                retention_score=rng.random(),
                gap_ms=rng.randint(60_000, 5 * 86_400_000),
            )
        )
    return samples


def topic_versions(settings: Settings) -> tuple[list[int], list[str]]:
    """Versions of the policy-updates topic in offset order, and the records that fail to decode."""
    versions, invalid = [], []
    for record in read_all(settings.bootstrap, settings.topic(topics.POLICY_UPDATES)):
        try:
            versions.append(decode_update(record.value).version)
        except InvalidPolicyUpdate as exc:
            invalid.append(f"offset {record.offset}: {exc.reason}")
    return versions, invalid


def checkpoint_meta(settings: Settings) -> dict[str, Any] | None:
    """Metadata of the newest checkpoint of a stopped worker's trainer, ``None`` without one."""
    with CheckpointStore(settings.work_dir / "checkpoints" / settings.app_id) as store:
        latest = store.load_latest()
    return None if latest is None else {"version": latest[0], **latest[2]}


class TrainerKillRun:
    """State of one ``run_trainer_killed``: settings, worker, served versions and findings."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.worker: WorkerProcess | None = None
        self.starts = 0
        # Served versions polled from each worker process, one list per start.
        self.served_versions: list[list[int]] = []
        self.kills: list[dict[str, Any]] = []
        self.recoveries: list[float] = []
        self.failures: list[str] = []

    def start(self) -> WorkerProcess:
        self.starts += 1
        worker, seconds = start_worker(self.settings, f"worker-{self.starts}.log")
        self.served_versions.append([])
        if self.starts > 1:
            self.recoveries.append(seconds)
        self.worker = worker
        return worker

    def current(self) -> WorkerProcess:
        if self.worker is None:
            raise TrainerFaultError("no worker started")
        return self.worker

    def poll(self) -> dict[str, Any] | None:
        """Read ``/stats/``, record the served version and flag one that went backwards.

        A restarted process serves version 0 (no policy, so ``/recommend/`` returns 503) until
        it has read the policy-updates topic. Its first nonzero version must not be older than
        the last one the killed process served.
        """
        stats = read_stats(self.current())
        if stats is None:
            return None
        version = stats["policy"]["version"]
        current = self.served_versions[-1]
        if current and version < current[-1]:
            self.failures.append(f"served version went back from {current[-1]} to {version}")
        if version > 0 and not any(v > 0 for v in current) and len(self.served_versions) > 1:
            before = max(self.served_versions[-2], default=0)
            if version < before:
                self.failures.append(
                    f"restarted worker first served version {version}, older than {before}"
                )
        current.append(version)
        return stats

    def wait_for(self, condition: Any, step: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            self.current().check_alive(step)
            stats = self.poll()
            if stats is not None and condition(stats):
                return stats
            time.sleep(POLL_S)
        raise TrainerFaultError(
            f"timed out after {self.timeout_s:.0f} s {step}; see {self.current().log_file}"
        )

    def kill_and_restart(self, publisher: PacedPublisher, trained: int, delay_s: float) -> None:
        """SIGKILL the worker ``delay_s`` after it trained ``trained`` samples, check, restart.

        Publishing pauses from the kill until the restarted worker trains again, so samples
        are still arriving at every kill.
        """
        self.wait_for(
            lambda s: s["trainer"]["version"] > 0 and (s["trainer"]["next_offset"] or 0) >= trained,
            f"waiting for {trained} trained samples",
        )
        time.sleep(delay_s)
        publisher.gate.clear()
        served_before = self.served_versions[-1][-1]
        kill(self.current(), signal.SIGKILL)
        meta = checkpoint_meta(self.settings)
        versions, invalid = topic_versions(self.settings)
        self.kills.append(
            {
                "trained_at_least": trained,
                "delay_s": round(delay_s, 3),
                "served_before": served_before,
                "checkpoint": meta,
            }
        )
        self._check_after_kill(meta, versions, invalid)
        worker = self.start()
        self._check_resumed(worker, meta, versions)
        publisher.gate.set()

    def _check_after_kill(
        self, meta: dict[str, Any] | None, versions: list[int], invalid: list[str]
    ) -> None:
        if invalid:
            self.failures.append(f"undecodable updates on the topic: {invalid}")
        if meta is None:
            self.failures.append("no checkpoint after the kill, though versions were published")
            return
        if meta["samples_seen"] != meta["next_offset"]:
            self.failures.append(
                f"checkpoint {meta['version']} learned {meta['samples_seen']} samples but resumes "
                f"at offset {meta['next_offset']}"
            )
        # A checkpoint is written before its update, so the topic never runs ahead of it.
        if versions and versions[-1] > meta["version"]:
            self.failures.append(
                f"topic has version {versions[-1]}, newest checkpoint {meta['version']}"
            )

    def _check_resumed(
        self, worker: WorkerProcess, meta: dict[str, Any] | None, versions: list[int]
    ) -> None:
        newest = versions[-1] if versions else 0
        stats = self.wait_for(
            lambda s: s["policy"]["version"] >= newest and s["trainer"]["active"],
            "waiting for the restarted worker to serve and train",
        )
        self.kills[-1]["served_after_restart"] = stats["policy"]["version"]
        restored = RESTORED_LINE.findall(worker.log_file.read_text())
        self.kills[-1]["restored"] = restored
        if meta is not None:
            want = (str(meta["version"]), str(meta["next_offset"]), str(meta["samples_seen"]))
            if restored[:1] != [want]:
                self.failures.append(f"trainer restored {restored}, checkpoint was {want}")


def run_trainer_killed(
    settings: Settings, prefix: str, seed: int, web_port: int, timeout_s: float
) -> dict[str, Any]:
    """SIGKILL a worker at seeded moments while its trainer publishes; check what it serves.

    Seeded synthetic samples go straight to the samples topic at ``SAMPLE_RATE`` per second and
    the trainer publishes every ``PUBLISH_EVERY_SAMPLES`` samples or second. ``published``
    counts the samples sent and ``applied`` the samples the newest update learned from, so
    ``lost`` and ``applied_twice`` show whether each sample was trained on once in the final
    model. ``recovery_seconds`` is the longest restart.
    """
    run_settings = dataclasses.replace(
        scenario_settings(settings, prefix, SCENARIO, web_port),
        publish_every_samples=PUBLISH_EVERY_SAMPLES,
    )
    reset_scenario(run_settings, settings.work_dir / "clusters")
    samples = synthetic_samples(run_settings, KILLED_SAMPLES, seed)
    topic = run_settings.topic(topics.SAMPLES)
    records = [Record(topic, str(s.user_id).encode(), encode(s)) for s in samples]
    rng = random.Random(f"{seed}-{SCENARIO}")
    run = TrainerKillRun(run_settings, timeout_s)
    run.start()
    publisher = PacedPublisher(run_settings, records, SAMPLE_RATE).start()
    try:
        points = sorted(rng.uniform(*KILL_WINDOW) for _ in range(TRAINER_KILLS))
        for point in points:
            run.kill_and_restart(publisher, int(point * len(records)), rng.uniform(0.0, 1.0))
        sent = publisher.join(len(records) / SAMPLE_RATE + timeout_s)
        final = _wait_trained(run, sent)
    finally:
        if run.worker is not None:
            run.worker.stop()
    return _outcome(run, sent, final)


def _wait_trained(run: TrainerKillRun, sent: int) -> dict[str, Any]:
    end = end_offsets(run.settings.bootstrap, run.settings.topic(topics.SAMPLES)).get(0, 0)
    if end != sent:
        run.failures.append(f"samples topic ends at offset {end}, {sent} samples sent")
    return run.wait_for(
        lambda s: (
            s["trainer"]["next_offset"] == end
            and s["trainer"]["published_samples_consumed"] == s["trainer"]["samples_consumed"]
            and s["policy"]["version"] == s["trainer"]["version"]
        ),
        "waiting for the trainer to publish every sample",
    )


def _outcome(run: TrainerKillRun, sent: int, final: dict[str, Any]) -> dict[str, Any]:
    versions, invalid = topic_versions(run.settings)
    if invalid:
        run.failures.append(f"undecodable updates on the topic: {invalid}")
    if any(later <= earlier for earlier, later in zip(versions, versions[1:], strict=False)):
        run.failures.append(f"versions on the topic do not increase: {versions}")
    applied = final["policy"]["samples_seen"]
    details = {
        "unit": "samples: published were sent to the samples topic, applied are those the "
        "newest policy update learned from",
        "kills": run.kills,
        "topic_versions": versions,
        "served_version": final["policy"]["version"],
        "served_versions_per_start": [sorted(set(seen)) for seen in run.served_versions],
        "restart_seconds": run.recoveries,
        "failures": run.failures,
    }
    if applied != sent:
        run.failures.append(f"the newest update learned from {applied} samples, {sent} were sent")
    details["passed"] = not run.failures
    logger.info("trainer-killed run finished %s", json.dumps(details, default=str))
    return {
        "published": sent,
        "applied": applied,
        "lost": max(0, sent - applied),
        "applied_twice": max(0, applied - sent),
        "dead_lettered": len(
            read_all(run.settings.bootstrap, run.settings.topic(topics.DEAD_LETTERS))
        ),
        "recovery_seconds": max(run.recoveries) if run.recoveries else None,
        "details": details,
    }


def publish_updates(settings: Settings, values: list[bytes]) -> None:
    """Publish raw policy-update records in order, keyed by their position."""
    topic = settings.topic(topics.POLICY_UPDATES)
    publish(settings, [Record(topic, str(i).encode(), value) for i, value in enumerate(values)])


def main(argv: list[str]) -> int:
    """Run the checkpoint writer child; returns the exit code."""
    if len(argv) != 3 or argv[0] != "write-checkpoints":
        print(
            "usage: python -m sec_online.trainerfaults write-checkpoints FOLDER SEED",
            file=sys.stderr,
        )
        return 2
    write_checkpoints(Path(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
