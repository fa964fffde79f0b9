"""Policy follower preload: the newest valid update among the topic's last records."""

from __future__ import annotations

import dataclasses

from sec_online import topics
from sec_online.kafka_admin import ensure_topics
from sec_online.policy import encode_update
from sec_online.reliability import Record, publish
from sec_online.runtime import topic_specs
from sec_online.settings import Settings
from sec_online.trainerfaults import bad_update_records, make_update
from streams.policy_follower import PolicyFollower


def small_settings(bootstrap: str, prefix: str) -> Settings:
    return dataclasses.replace(
        Settings(data_dir=None),
        bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        app_id=f"{prefix}app",
        clusters=4,
        levels=2,
        hidden_size=8,
        batch_size=8,
    )


def test_preload_empty_topic(kafka_bootstrap, topic_prefix):
    settings = small_settings(kafka_bootstrap, topic_prefix)
    ensure_topics(settings.bootstrap, topic_specs(settings))
    follower = PolicyFollower(settings)
    assert follower.preload() == 0
    assert follower.update is None


def test_preload_skips_bad_newest(kafka_bootstrap, topic_prefix):
    settings = small_settings(kafka_bootstrap, topic_prefix)
    ensure_topics(settings.bootstrap, topic_specs(settings))
    topic = settings.topic(topics.POLICY_UPDATES)
    first, second = make_update(settings, 1, seed=1), make_update(settings, 2, seed=2)
    broken, reason = bad_update_records(make_update(settings, 3, seed=3))["altered_weights"]
    values = [encode_update(first), encode_update(second), broken]
    publish(settings, [Record(topic, str(i + 1).encode(), value) for i, value in enumerate(values)])
    follower = PolicyFollower(settings)
    assert follower.preload() == 2
    assert follower.update.version == 2
    assert follower.invalid_update_reasons == {reason: 1}
    assert follower.policy is not None
