"""Load generator for the worker's ``/recommend/`` page, run as its own process.

It runs apart from the benchmark so that its event loop does not share a core's time slices
with the code under measurement any more than two processes on one machine must. It prints one
JSON object on stdout: request count, errors, and latency percentiles in ms.

    python -m benchmarks.http_load --base-url http://127.0.0.1:6066 --user-ids 1,2,3 \
        --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from urllib.parse import urlparse

import aiohttp
import numpy as np


def _local_url(url: str) -> str:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"--base-url must point at 127.0.0.1, got {url!r}")
    return url.rstrip("/")


async def _load(base_url: str, users: list[int], requests: int, concurrency: int) -> dict:
    rng = random.Random(0)
    paths = [f"{base_url}/recommend/{rng.choice(users)}/" for _ in range(requests)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path = queue.get_nowait()
            started = time.perf_counter()
            try:
                async with session.get(path) as response:
                    await response.read()
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            if status != 200:
                errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    values = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "requests": requests,
        "ok": len(latencies),
        "errors": errors,
        "concurrency": concurrency,
        "seconds": seconds,
        "requests_per_second": len(latencies) / seconds if seconds > 0 else 0.0,
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the load and print its JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="worker root URL on 127.0.0.1")
    parser.add_argument("--user-ids", required=True, help="comma-separated user ids to request")
    parser.add_argument("--requests", type=int, default=2000, help="total requests to send")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    args = parser.parse_args(argv)
    users = [int(value) for value in args.user_ids.split(",") if value]
    if not users or args.requests < 1 or args.concurrency < 1:
        parser.error("--user-ids, --requests and --concurrency must be non-empty and positive")
    result = asyncio.run(_load(_local_url(args.base_url), users, args.requests, args.concurrency))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
