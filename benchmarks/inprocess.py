"""In-process timings of the worker's steps on the benchmark's own records, without Kafka.

Each stage runs the product's function over the same records the pipeline consumes, so the
per-event costs add up to a ceiling for one worker process. The gap between that ceiling and the
pipeline is the cost of Faust, the changelog and the event loop.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from faust.serializers import codecs
from faust.stores.rocksdb import RocksDBOptions
from tqdm import tqdm

from benchmarks.kafka_io import Record
from sec_online.clusters import build_clusters
from sec_online.levels import even_boundaries
from sec_online.policy import Policy
from sec_online.schemas import Impression, Sample, decode_impression, decode_return, encode
from sec_online.settings import Settings
from sec_online.trainer import Trainer
from sec_online.userstate import UserStateMachine

logger = logging.getLogger(__name__)

SERVING_CALLS = 2_000
PER_USER_FLOAT_JITTER = 0.1


def _us_per(seconds: float, count: int) -> float:
    return seconds / count * 1e6 if count else 0.0


def time_stages(settings: Settings, records: Sequence[Record], store_dir: Path) -> dict[str, Any]:
    """Time decode, state update, table value (de)serialisation, RocksDB and sample encoding.

    Returns per-stage microseconds per event (or per sample), the ceiling events per second of
    their sum, and the final user states and emitted samples for the later measurements.
    """
    clusters = build_clusters(settings)
    machine = UserStateMachine(settings.clusters, clusters.cluster_of, settings.score_decay)
    boundaries = even_boundaries(settings.levels)
    started = time.perf_counter()
    events = [
        decode_return(r.value) if r.is_return else decode_impression(r.value) for r in records
    ]
    decode_s = time.perf_counter() - started

    states: dict[bytes, dict[str, Any]] = {}
    samples: list[Sample] = []
    started = time.perf_counter()
    for record, event in zip(records, events, strict=True):
        previous = states.get(record.key)
        if isinstance(event, Impression):
            outcome = machine.apply_impression(previous, event)
        else:
            outcome = machine.apply_return(previous, event, boundaries, 0)
        states[record.key] = outcome.state
        samples.extend(outcome.samples)
    state_s = time.perf_counter() - started

    serde_s = _time_serde(records, states)
    rocksdb_s = _time_rocksdb(records, states, store_dir)
    started = time.perf_counter()
    for sample in samples:
        encode(sample)
    sample_s = time.perf_counter() - started

    per_event = {
        "decode_validate_us": _us_per(decode_s, len(records)),
        "state_update_us": _us_per(state_s, len(records)),
        "table_json_serde_us": _us_per(serde_s, len(records)),
        "rocksdb_get_put_us": _us_per(rocksdb_s, len(records)),
        "sample_encode_us_per_event": _us_per(sample_s, len(records)),
    }
    total_us = sum(per_event.values())
    return {
        "events": len(records),
        "samples": len(samples),
        "users": len(states),
        "per_event_us": per_event,
        "sample_encode_us_per_sample": _us_per(sample_s, len(samples)),
        "ceiling_eps": 1e6 / total_us if total_us else 0.0,
        "_machine": machine,
        "_states": states,
        "_samples": samples,
    }


def _time_serde(records: Sequence[Record], states: dict[bytes, dict[str, Any]]) -> float:
    # Faust's json value codec (orjson when installed) runs once per table read and once per
    # write.
    codec = codecs.get_codec("json")
    started = time.perf_counter()
    for record in records:
        codec.loads(codec.dumps(states[record.key]))
    return time.perf_counter() - started


def _time_rocksdb(
    records: Sequence[Record], states: dict[bytes, dict[str, Any]], store_dir: Path
) -> float:
    values = {key: json.dumps(state).encode() for key, state in states.items()}
    path = store_dir / "stage-timing.db"
    db = RocksDBOptions(use_rocksdict=True).open(path)
    try:
        started = time.perf_counter()
        for record in records:
            db.get(record.key)
            db.put(record.key, values[record.key])
        return time.perf_counter() - started
    finally:
        db.close()
        shutil.rmtree(path, ignore_errors=True)


def time_trainer(settings: Settings, n_features: int, samples: Sequence[Sample]) -> dict[str, Any]:
    """Train a fresh trainer on ``samples`` as the worker does; returns samples/s and the update.

    Samples go to ``learn_many`` in calls of four batches, the worker's grouping, on one torch
    thread as in the worker. Building a policy update (selector fit, serialisation) is timed apart.
    """
    if not samples:
        raise ValueError("no samples to train on: the benchmark slice closed no session")
    torch.set_num_threads(1)
    trainer = Trainer(n_features, settings.clusters, settings)
    call = settings.batch_size * 4
    started = time.perf_counter()
    for start in range(0, len(samples), call):
        trainer.learn_many(samples[start : start + call])
    learn_s = time.perf_counter() - started
    started = time.perf_counter()
    update = trainer.make_update(1, int(time.time() * 1000))
    update_s = time.perf_counter() - started
    return {
        "samples": len(samples),
        "steps": trainer.steps,
        "samples_per_second": len(samples) / learn_s,
        "make_update_ms": update_s * 1000,
        "_update": update,
    }


def time_serving(
    machine: UserStateMachine, policy: Policy, states: dict[bytes, dict[str, Any]], calls: int
) -> dict[str, float]:
    """Latency of one recommendation: feature vector, historical level and the policy's call.

    This is the work of the ``/recommend/`` page without HTTP and the table read.
    """
    torch.set_num_threads(1)
    users = list(states.values())
    rng = random.Random(0)
    latencies = []
    for _ in range(calls):
        state = rng.choice(users)
        started = time.perf_counter()
        features = machine.features(state)
        policy.recommend(features, machine.historical_level(state), top_k=5)
        latencies.append(time.perf_counter() - started)
    values = np.asarray(latencies) * 1000
    return {
        "calls": calls,
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def measure_state_size(
    states: dict[bytes, dict[str, Any]],
    users: int,
    store_dir: Path,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the bytes per user of state on a synthetic population of ``users`` users.

    Each synthetic user is a copy of a random real state from the slice, with a new user id
    and its history floats scaled by a random factor in [0.9, 1.1], so RocksDB cannot compress
    copies against each other. Disk is the RocksDB folder after a flush and a full compaction,
    with the options Faust uses. Memory is what the states take as Python dicts (tracemalloc,
    on up to 20,000 of them), the cost of holding them in an in-memory table.
    """
    rng = random.Random(seed)
    real = list(states.values())
    path = store_dir / "state-size.db"
    db = RocksDBOptions(use_rocksdict=True).open(path)
    value_bytes = 0
    try:
        for user_id in tqdm(
            range(users), desc="synthetic users", unit="user", disable=not progress
        ):
            state = _synthetic_state(rng.choice(real), user_id, rng)
            value = json.dumps(state).encode()
            value_bytes += len(value)
            db.put(str(user_id).encode(), value)
        db.flush()
        db.compact_range(None, None)
    finally:
        db.close()
    disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    shutil.rmtree(path, ignore_errors=True)
    memory = _dict_bytes_per_user(real, min(users, 20_000), rng)
    return {
        "synthetic_users": users,
        "real_users_sampled_from": len(real),
        "value_bytes_per_user": value_bytes / users,
        "rocksdb_disk_bytes_per_user": disk / users,
        "python_dict_bytes_per_user": memory,
        "disk_mb_per_million_users": disk / users * 1e6 / 2**20,
        "memory_mb_per_million_users": memory * 1e6 / 2**20,
    }


def _synthetic_state(template: dict[str, Any], user_id: int, rng: random.Random) -> dict:
    state = copy.deepcopy(template)
    state["user_id"] = user_id
    history = state["history"]
    factor = rng.uniform(1 - PER_USER_FLOAT_JITTER, 1 + PER_USER_FLOAT_JITTER)
    for name in ("impressions", "sessions", "watch"):
        history[name] *= factor
    history["signals"] = [value * factor for value in history["signals"]]
    history["clusters"] = [value * rng.uniform(0.9, 1.1) for value in history["clusters"]]
    return state


def _dict_bytes_per_user(real: list[dict[str, Any]], users: int, rng: random.Random) -> float:
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        population = [_synthetic_state(rng.choice(real), i, rng) for i in range(users)]
        used = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    del population
    return used / users
