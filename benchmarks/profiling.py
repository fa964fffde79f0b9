"""Sampling profile of a running worker with py-spy, summarised by function and by stage.

py-spy (https://github.com/benfred/py-spy) is an external tool, not a dependency of the
project: the benchmark runs it when ``--py-spy`` names the executable, and skips the profile
otherwise. It samples with ``--nonblocking``, so the worker is not paused, but the sampler still
takes CPU time from a machine with few cores.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 100
TOP_FUNCTIONS = 15
# Stages of the worker, each recognised by a pattern over the frames of a stack. A stack counts
# for every stage it contains, so the inclusive shares can add up to more than 100%.
STAGES = {
    "batch_processing": r"streams/processing\.py",
    "decode_validate": r"sec_online/schemas\.py",
    "state_update": r"sec_online/userstate\.py",
    "table_get_set": r"faust/tables/|faust/stores/",
    "rocksdb": r"rocksdict|faust/stores/rocksdb\.py",
    "json_serde": r"json/(encoder|decoder)\.py|faust/serializers/",
    "changelog_or_sample_produce": r"faust/transport/producer|aiokafka/producer/",
    "consumer_fetch": r"aiokafka/consumer/|faust/transport/consumer|faust/transport/drivers/",
    "trainer": r"sec_online/trainer\.py|streams/training\.py",
    "policy_follow": r"streams/policy_follower\.py|sec_online/policy\.py",
    "web": r"faust/web/|aiohttp/",
}
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def record(py_spy: str, pid: int, seconds: int, output: Path) -> Path | None:
    """Record ``seconds`` of samples of process ``pid`` into a collapsed-stack file.

    Returns the file, or None when py-spy failed; the failure is logged with py-spy's output.
    """
    command = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(SAMPLE_RATE_HZ),
        "--format",
        "raw",
        "--nonblocking",
        "--output",
        str(output),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.error("py-spy failed to run: %s", exc)
        return None
    if result.returncode != 0 or not output.exists():
        logger.error("py-spy exited with code %d: %s", result.returncode, result.stderr.strip())
        return None
    return output


def summarise(collapsed: Path) -> dict[str, Any]:
    """Top functions by own and inclusive samples, and each stage's inclusive share.

    ``collapsed`` has one stack per line, frames root first separated by ``;``, then a space
    and the sample count (py-spy's ``raw`` format).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        for stage, pattern in STAGES.items():
            if re.search(pattern, stack):
                stages[stage] += count
    if total == 0:
        return {"samples": 0, "own": [], "inclusive": [], "stages_inclusive_pct": {}}
    return {
        "samples": total,
        "own": _top(own, total),
        "inclusive": _top(inclusive, total),
        "stages_inclusive_pct": {name: 100 * stages[name] / total for name in STAGES},
    }


def _short(frame: str) -> str:
    """``function (file:line)`` with the file cut to its package path and the line dropped."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('function')} ({path})"


def _top(counter: Counter[str], total: int) -> list[dict[str, Any]]:
    return [
        {"function": name, "samples": count, "pct": 100 * count / total}
        for name, count in counter.most_common(TOP_FUNCTIONS)
    ]
