"""HTTP pages of the worker, served by Faust's web server on 127.0.0.1:``web_port``.

- ``/health/``: liveness.
- ``/stats/``: counters of this worker; ``?exact=1`` adds users per level counted from the table.
- ``/users/{user_id}/``: the user's state, from the worker that owns the user's partition.
- ``/recommend/{user_id}/``: selected level, the expert's top clusters and the policy version.
- ``/metrics``: the same counters in the Prometheus text format, plus the serving latency.
- ``/dashboard/``: a live page over ``/dashboard/data/`` (see ``streams.dashboard``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sec_online import topics
from streams.dashboard import register_dashboard
from streams.metrics import PrometheusMetrics, consumer_lag

if TYPE_CHECKING:
    from streams.app import Worker


def register_pages(worker: Worker) -> None:
    """Add the worker's pages to its Faust app."""
    app = worker.app
    prometheus = PrometheusMetrics(lambda: stats_snapshot(worker), worker.settings.topic)

    @app.page("/health/")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/stats/")
    async def stats(web: Any, request: Any) -> Any:
        return web.json(stats_snapshot(worker, exact=request.query.get("exact") == "1"))

    @app.page("/metrics")
    async def metrics(web: Any, request: Any) -> Any:
        body, content_type = prometheus.exposition(request.headers.get("Accept"))
        return web.bytes(body, headers={"Content-Type": content_type})

    @app.page("/users/{user_id}/")
    @app.table_route(table=worker.users, match_info="user_id")
    async def user_state(web: Any, request: Any, user_id: str) -> Any:
        error = invalid_user_id(user_id)
        if error:
            return web.json({"error": error}, status=400)
        state = worker.users.get(user_id.encode())
        if state is None:
            return web.json({"error": f"user {user_id} not found"}, status=404)
        return web.json(state)

    @app.page("/recommend/{user_id}/")
    @app.table_route(table=worker.users, match_info="user_id")
    async def recommend(web: Any, request: Any, user_id: str) -> Any:
        top = request.query.get("top", "5")
        if not top.isdigit() or int(top) < 1:
            return web.json({"error": f"invalid top={top!r}: expected an integer >= 1"}, status=400)
        started = time.perf_counter()
        body, status = recommend_for(worker, user_id, int(top))
        if status == 200:
            worker.metrics.record_recommendation(body["level"])
            prometheus.recommend_latency.observe(time.perf_counter() - started)
        return web.json(body, status=status)

    register_dashboard(worker, lambda: stats_snapshot(worker))


def invalid_user_id(user_id: str) -> str | None:
    """Why a user id from a URL is not usable, or None when it is.

    Ids are canonical decimal text, as in the Kafka keys: "0712" would be routed to another
    partition than user 712, so it is rejected instead of being read as 712.
    """
    if not user_id.isdigit() or user_id != str(int(user_id)):
        return f"invalid user id {user_id!r}: expected a non-negative integer without leading zeros"
    return None


def recommend_for(worker: Worker, user_id: str, top_k: int) -> tuple[dict[str, Any], int]:
    """Recommendation for one user as a JSON body and an HTTP status."""
    error = invalid_user_id(user_id)
    if error:
        return {"error": error}, 400
    policy = worker.policy.policy
    if policy is None:
        return {"error": "no policy update received yet; wait for the trainer to publish"}, 503
    state = worker.users.get(user_id.encode())
    if state is None:
        state = worker.machine.new_state(int(user_id))
    features = worker.machine.features(state)
    historical = worker.machine.historical_level(state)
    recommendation = policy.recommend(features, historical, top_k=top_k)
    body = dataclasses.asdict(recommendation)
    body["user_id"] = int(user_id)
    body["known_user"] = state["impressions"] > 0 or state["returns"] > 0
    return body, 200


def stats_snapshot(worker: Worker, *, exact: bool = False) -> dict[str, Any]:
    """Body of ``/stats/``, which ``/metrics`` and the dashboard also read.

    ``exact`` adds ``table``: users per level and session counts from a scan of the whole table,
    which takes time in proportion to the number of users.
    """
    body = worker.metrics.as_dict()
    body["trainer"] = worker.trainer.as_dict()
    body["trainer"]["samples_per_second"] = body.pop("samples_trained_per_second")
    update = worker.policy.update
    body["policy"] = {
        "version": update.version if update else 0,
        "samples_seen": update.samples_seen if update else 0,
        "created_ms": update.created_ms if update else None,
        "age_seconds": time.time() - update.created_ms / 1000 if update else None,
        "boundaries": worker.policy.boundaries()[0],
        "selector": update.selector if update else None,
        "invalid_updates": worker.policy.invalid_updates,
        "invalid_update_reasons": dict(worker.policy.invalid_update_reasons),
    }
    body["consumer_lag"] = consumer_lag(worker.app, topics.user_keyed(worker.settings))
    if exact:
        body["table"] = _scan_users(worker)
    return body


def _scan_users(worker: Worker) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    users = open_sessions = pending = 0
    example, max_closed = None, -1
    for _key, state in worker.users.items():
        users += 1
        if state["closed_sessions"] > max_closed:
            example, max_closed = state["user_id"], state["closed_sessions"]
        levels["unrated" if state["level"] is None else str(state["level"])] += 1
        open_sessions += len(state["open"])
        pending += len(state["pending"])
    return {
        "users": users,
        "users_per_level": dict(levels),
        "open_sessions": open_sessions,
        "pending_closes": pending,
        "most_active_user": example,
    }
