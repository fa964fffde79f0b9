"""Keep a background consumer loop running across broker errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

RETRY_SECONDS = 2.0


async def run_forever(
    name: str,
    loop_once: Callable[[], Awaitable[None]],
    logger: logging.Logger,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Await ``loop_once`` again after each failure, until the task is cancelled.

    Every failure is logged at WARNING with the attempt number, then ``on_error`` runs (to drop
    state that the failed connection owned) and the loop waits ``RETRY_SECONDS``.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            await loop_once()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any client error: log, wait, reconnect
            logger.warning(
                "%s failed (attempt %d), retrying in %.0f s: %s", name, attempt, RETRY_SECONDS, exc
            )
            if on_error is not None:
                on_error()
            await asyncio.sleep(RETRY_SECONDS)
