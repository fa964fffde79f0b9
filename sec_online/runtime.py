"""Start-up steps shared by the worker, replay and the main job: topics and the Faust worker."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from sec_online import topics
from sec_online.kafka_admin import KafkaAdminError, TopicSpec, ensure_topics, wait_for_broker
from sec_online.logs import logging_config, setup_logging
from sec_online.settings import Settings

# Name of the worker's users table; its changelog topic is named after it.
USERS_TABLE = "users"

logger = logging.getLogger(__name__)

# Events and samples are kept forever, so replaying the topics re-runs a past experiment exactly;
# dead letters and policy updates are kept for a week at most.
KEEP_FOREVER = {"retention.ms": "-1"}
WEEK_MS = str(7 * 24 * 3600 * 1000)
# A trainer publishes about once a second while samples arrive, some 100 kB each, so a week of
# updates could reach tens of GB: the topic also keeps at most 1 GiB, in segments of 64 MiB.
POLICY_UPDATES_CONFIG = {
    "retention.ms": WEEK_MS,
    "retention.bytes": str(1024**3),
    "segment.bytes": str(64 * 1024**2),
    "max.message.bytes": str(8 * 1024 * 1024),
}


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Return every topic the worker reads or writes, with its partition count."""
    specs = [
        TopicSpec(name, settings.partitions, dict(KEEP_FOREVER))
        for name in topics.user_keyed(settings)
    ]
    specs.append(TopicSpec(settings.topic(topics.SAMPLES), 1, dict(KEEP_FOREVER)))
    specs.append(TopicSpec(settings.topic(topics.POLICY_UPDATES), 1, dict(POLICY_UPDATES_CONFIG)))
    # Faust would create the users table's changelog itself, but a worker can then take its
    # first partition assignment before the new topic is in its metadata. It then finds 0 changelog
    # partitions and every table write fails until the next rebalance.
    specs.append(
        TopicSpec(
            changelog_topic(settings),
            settings.partitions,
            # A user's state keeps the event ids of the open session's impressions, so a long
            # session makes a large record. NOTE: a state over 8 MiB still fails to reach the
            # changelog (Faust logs a warning) and would be lost on recovery.
            {"cleanup.policy": "compact", "max.message.bytes": str(8 * 1024 * 1024)},
        )
    )
    specs.append(
        TopicSpec(
            settings.topic(topics.DEAD_LETTERS),
            1,
            {"retention.ms": WEEK_MS, "max.message.bytes": str(8 * 1024 * 1024)},
        )
    )
    return specs


def users_table_name(settings: Settings) -> str:
    """Name of the worker's users table; the topic prefix keeps prefixed runs apart."""
    return settings.topic(USERS_TABLE)


def changelog_topic(settings: Settings) -> str:
    """Name of the users table's changelog topic, as Faust derives it from app id and table."""
    return f"{settings.app_id}-{users_table_name(settings)}-changelog"


def create_topics(settings: Settings) -> list[str]:
    """Create missing topics; raise if an existing one has another partition count."""
    specs = topic_specs(settings)
    ensure_topics(settings.bootstrap, specs)
    return [spec.name for spec in specs]


def ensure_broker(settings: Settings) -> Any:
    """Start the managed broker when no cluster is configured and it is not running.

    Returns the broker when this call started it, so the caller can stop it again, and ``None``
    when an external cluster is used or the managed broker was already running.
    """
    if not settings.managed_broker:
        wait_for_broker(settings.bootstrap, timeout_s=60.0)
        return None
    from sec_online.broker import ManagedBroker

    broker = ManagedBroker(settings)
    if broker.status().running:
        return None
    broker.start()
    return broker


def run_worker(settings: Settings, web_port: int | None = None) -> int:
    """Run one Faust worker in this process until it is stopped (SIGTERM or Ctrl-C)."""
    import faust
    import torch

    from streams.app import build_worker

    if web_port is not None:
        settings = dataclasses.replace(settings, web_port=web_port)
    ids = {"worker": f"{settings.app_id}@{settings.web_host}:{settings.web_port}"}
    setup_logging(settings.log_level, settings.log_format, ids)
    wait_for_broker(settings.bootstrap, timeout_s=60.0)
    create_topics(settings)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    # The models are small: one thread per matrix product avoids contention with the event loop.
    torch.set_num_threads(1)
    # Torch imports its compiler stack the first time an optimizer is built, which took 3 to
    # 9 s here. Doing it now keeps that pause out of the event loop when the trainer starts.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    worker = build_worker(settings)
    # A return's level depends on the boundaries, so the first returns after a restart must see
    # the newest published ones, not the initial split.
    try:
        version = worker.policy.preload()
    except KafkaAdminError as exc:
        logger.warning("policy preload failed, the follower reads the topic later: %s", exc)
    else:
        logger.info("policy preloaded version=%d", version)
    logger.info(
        "starting worker app_id=%s bootstrap=%s web=http://127.0.0.1:%d partitions=%d",
        settings.app_id,
        settings.bootstrap,
        settings.web_port,
        settings.partitions,
    )
    faust.Worker(
        worker.app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level, settings.log_format, ids),
        redirect_stdouts=False,
    ).execute_from_commandline()
    return 0
