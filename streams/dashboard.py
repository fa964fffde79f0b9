"""Live dashboard of one worker: a static page that polls ``/dashboard/data/``.

The page (``streams/static/``) draws with inline SVG in plain JavaScript and requests nothing but
this worker's own pages, so it works without network access beyond the worker.

- ``/dashboard/``: the page.
- ``/dashboard/static/{name}``: its script and style sheet.
- ``/dashboard/data/``: one JSON snapshot, the ``/stats/`` figures with shortened timelines and
  the expert selection shares.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sec_online.policy import Policy
    from sec_online.userstate import UserStateMachine
    from streams.app import Worker

logger = logging.getLogger(__name__)

# Files under streams/static/ that /dashboard/static/{name} serves, with their content types.
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
# Newest timeline points sent to the page; /stats/ keeps the full timelines.
TIMELINE_POINTS_SENT = 400
# The selection over recent users is computed again at most this often, in seconds.
SELECTION_REFRESH_SECONDS = 5.0


def register_dashboard(worker: Worker, snapshot: Callable[[], Mapping[str, Any]]) -> None:
    """Add the dashboard pages to the worker's Faust app.

    ``snapshot`` returns the body of ``/stats/`` without the table scan.
    """
    app = worker.app
    selection = RecentUserSelection()

    @app.page("/dashboard/")
    async def page(web: Any, request: Any) -> Any:
        return web.html(_static_text("dashboard.html"))

    @app.page("/dashboard/static/{name}")
    async def static(web: Any, request: Any, name: str) -> Any:
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            return web.json({"error": f"static file {name!r} not found"}, status=404)
        return web.text(_static_text(name), content_type=content_type)

    @app.page("/dashboard/data/")
    async def data(web: Any, request: Any) -> Any:
        stats = snapshot()
        recent = selection.shares(worker)
        return web.json(dashboard_data(stats, recent))


def _static_text(name: str) -> str:
    return resources.files("streams").joinpath("static", name).read_text(encoding="utf-8")


def dashboard_data(stats: Mapping[str, Any], recent_users: dict[str, Any]) -> dict[str, Any]:
    """Body of ``/dashboard/data/`` from a ``/stats/`` snapshot.

    Parameters
    ----------
    stats
        The body of ``/stats/``.
    recent_users
        Output of ``RecentUserSelection.shares``.
    """
    policy = stats["policy"]
    lag_rows = stats["consumer_lag"]
    return {
        "time_ms": int(time.time() * 1000),
        "uptime_seconds": stats["uptime_seconds"],
        "consumed": stats["consumed"],
        "applied": stats["applied"],
        "duplicates": stats["duplicates"],
        "dead_letters_total": stats["dead_letters_total"],
        "samples_emitted": stats["samples_emitted"],
        "last_event_ms": stats["last_event_ms"],
        "users_per_level": stats["users_per_level"],
        "level_timeline": _level_timeline(stats),
        "loss_timeline": stats["loss_timeline"][-TIMELINE_POINTS_SENT:],
        "boundaries": policy["boundaries"],
        "policy": {"version": policy["version"], "age_seconds": policy["age_seconds"]},
        "trainer": {
            key: stats["trainer"][key]
            for key in ("active", "version", "steps", "last_loss", "samples_per_second")
        },
        "consumer_lag": lag_rows,
        "consumer_lag_total": sum(row["lag"] for row in lag_rows if row["lag"] is not None),
        "selection": {
            "recommendations": level_shares(stats["recent_recommendations"]),
            "recent_users": recent_users,
        },
    }


def _level_timeline(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    # The worker records a point every few hundred returns. The current counts are appended as
    # the newest point, so the chart ends at the figures shown beside it.
    points = list(stats["level_timeline"][-(TIMELINE_POINTS_SENT - 1) :])
    if stats["last_event_ms"] > 0:
        now = {"event_ms": stats["last_event_ms"], "levels": stats["users_per_level"]}
        points.append(now)
    return points


def level_shares(counts: Mapping[str, int]) -> dict[str, Any]:
    """Counts per level with their shares of the total (shares are empty for no counts)."""
    total = sum(counts.values())
    shares = {level: count / total for level, count in counts.items()} if total else {}
    return {"total": total, "counts": dict(counts), "shares": shares}


class RecentUserSelection:
    """Levels that the served policy's selector picks for the recently active users.

    The selection of up to ``RECENT_USERS`` users costs one batched forward pass, so it is
    computed at most every SELECTION_REFRESH_SECONDS and kept in between.
    """

    def __init__(self) -> None:
        self.computed_at = -float("inf")
        self.version = -1
        self.result: dict[str, Any] = {"version": 0, **level_shares({})}

    def shares(self, worker: Worker) -> dict[str, Any]:
        """Selected levels of the users in ``worker.metrics.recent_users``, cached."""
        policy = worker.policy.policy
        if policy is None:
            return self.result
        now = time.monotonic()
        fresh = now - self.computed_at < SELECTION_REFRESH_SECONDS
        if fresh and policy.version == self.version:
            return self.result
        states = [worker.users.get(key) for key in list(worker.metrics.recent_users)]
        counts = select_levels(policy, worker.machine, [s for s in states if s is not None])
        self.result = {"version": policy.version, **level_shares(counts)}
        self.computed_at, self.version = now, policy.version
        return self.result


def select_levels(
    policy: Policy, machine: UserStateMachine, states: Iterable[dict[str, Any]]
) -> Counter[str]:
    """Count the levels the selector picks for user states, in one batch."""
    states = list(states)
    if not states:
        return Counter()
    features = torch.tensor([machine.features(s) for s in states], dtype=torch.float32)  # [B, F]
    historical = torch.tensor([machine.historical_level(s) for s in states])  # [B]
    with torch.inference_mode():
        encoded = policy.model.encode(features)  # [B, H]
        levels = policy.selector.select(encoded, historical)  # [B]
    return Counter(str(int(level)) for level in levels)
