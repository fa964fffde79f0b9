"""Read the recorded event topics back into a log table, for exact offline re-evaluation.

The impressions topic contains every field of the log rows the evaluation needs, so reading it from
given offsets gives the same table on every run: the same topics, offsets and seed give the same
numbers. The offsets actually read are kept for the report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from sec_online import topics
from sec_online.kafka_admin import offset_ranges, read_range
from sec_online.replay import IMPRESSION_COLUMNS
from sec_online.schemas import FEEDBACK_SIGNALS, InvalidRecord, decode_impression
from sec_online.settings import Settings

logger = logging.getLogger(__name__)

# Impression fields and the log columns of ``sec_online.data.read_log`` they map to: the
# replay's mapping, read the other way.
LOG_COLUMNS = dict(IMPRESSION_COLUMNS)
READ_TIMEOUT_S = 300.0


@dataclass
class RecordedLog:
    """Log rows read from the impressions topic, and what was read to get them.

    ``offsets`` maps each topic read to ``{partition: [start, end)}``. ``invalid`` counts records
    that failed validation and ``duplicates`` repeated event ids; neither enters ``log``.
    """

    log: pd.DataFrame
    offsets: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    invalid: int = 0
    duplicates: int = 0
    out_of_range: int = 0

    def to_dict(self) -> dict[str, Any]:
        """What was read, for the report (without the rows)."""
        return {
            "rows": len(self.log),
            "offsets": self.offsets,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "out_of_range": self.out_of_range,
        }


def read_recorded(
    settings: Settings,
    *,
    start: dict[int, int] | None = None,
    end: dict[int, int] | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> RecordedLog:
    """Read ``impressions`` in the offset range and keep rows with ``start_ms <= time_ms < end_ms``.

    The offsets of ``returns`` and ``samples`` up to their current ends are recorded too, so the
    report names everything the run depended on.
    """
    name = settings.topic(topics.IMPRESSIONS)
    records, offsets = read_range(
        settings.bootstrap, name, start=start, end=end, timeout_s=READ_TIMEOUT_S
    )
    recorded = _rows_from(records, start_ms, end_ms)
    recorded.offsets[name] = _plain_offsets(offsets)
    for other in (topics.RETURNS, topics.SAMPLES):
        recorded.offsets[settings.topic(other)] = offset_ranges(
            settings.bootstrap, settings.topic(other)
        )
    logger.info(
        "read %d impressions from %s (invalid=%d duplicates=%d out_of_range=%d)",
        len(recorded.log),
        name,
        recorded.invalid,
        recorded.duplicates,
        recorded.out_of_range,
    )
    return recorded


def _rows_from(records: list[Any], start_ms: int | None, end_ms: int | None) -> RecordedLog:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    recorded = RecordedLog(log=pd.DataFrame())
    for record in records:
        try:
            impression = decode_impression(record.value)
        except InvalidRecord:
            recorded.invalid += 1
            continue
        if impression.event_id in seen:
            recorded.duplicates += 1
            continue
        seen.add(impression.event_id)
        if (start_ms is not None and impression.time_ms < start_ms) or (
            end_ms is not None and impression.time_ms >= end_ms
        ):
            recorded.out_of_range += 1
            continue
        rows.append({column: getattr(impression, key) for key, column in LOG_COLUMNS.items()})
    recorded.log = _as_log(rows)
    return recorded


def _as_log(rows: list[dict[str, Any]]) -> pd.DataFrame:
    log = pd.DataFrame(rows, columns=list(LOG_COLUMNS.values()))
    signal_columns = [LOG_COLUMNS[name] for name in FEEDBACK_SIGNALS]
    log[signal_columns] = log[signal_columns].astype("int8")
    # Records come partition by partition; one user's rows share a partition and keep their
    # order there, so a stable sort by time and user restores the log's order for every user.
    return log.sort_values(["time_ms", "user_id"], kind="stable").reset_index(drop=True)


def _plain_offsets(offsets: dict[int, tuple[int, int]]) -> dict[int, list[int]]:
    return {partition: [first, last] for partition, (first, last) in sorted(offsets.items())}
