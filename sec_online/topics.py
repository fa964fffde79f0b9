"""Topic names and layouts. Full names carry ``Settings.topic_prefix``."""

from __future__ import annotations

from sec_online.settings import Settings

IMPRESSIONS = "impressions"
RETURNS = "returns"
SAMPLES = "samples"
POLICY_UPDATES = "policy-updates"
DEAD_LETTERS = "dead-letters"


def user_keyed(settings: Settings) -> list[str]:
    """Topics keyed by user id; they share one partition count so tables stay co-partitioned."""
    return [settings.topic(IMPRESSIONS), settings.topic(RETURNS)]


def single_partition(settings: Settings) -> list[str]:
    """Topics with one partition: one trainer reads every sample, updates keep their order."""
    return [settings.topic(SAMPLES), settings.topic(POLICY_UPDATES), settings.topic(DEAD_LETTERS)]
