"""Tell the operator when the worker's Kafka broker is unreachable, and keep the log readable.

While the broker is down, aiokafka 0.14 retries every connection on its own (its default
``retry_backoff_ms`` is 100) and logs an ERROR for each attempt. The worker's Kafka clients
wrote about 12,000 lines in one outage of about 60 s (the ``broker_restart`` reliability
scenario). ``BrokerWatch`` probes the bootstrap servers instead and logs one WARNING every
``WARNING_INTERVAL_S`` that names the broker, how long it has been unreachable and what is
retried, then one INFO line when it is back. ``RepeatFilter`` lets through one line per message
template and ``REPEAT_INTERVAL_S`` from the Kafka client loggers and counts the others.
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_TIMEOUT_S = 1.0
WARNING_INTERVAL_S = 10.0
REPEAT_INTERVAL_S = 30.0
# A logger's filters see only the records logged on it, not those of its children, so every
# logger that repeats a line per connection attempt is listed (aiokafka 0.14).
CLIENT_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.consumer.fetcher",
    "aiokafka.consumer.group_coordinator",
    "aiokafka.producer.sender",
)


class RepeatFilter(logging.Filter):
    """Drop a record whose logger and template already passed within ``interval_s`` seconds.

    The next record of a template that passes carries the number of records dropped since.
    """

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        template = (record.name, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(template, -self.interval_s) < self.interval_s:
            self._dropped[template] = self._dropped.get(template, 0) + 1
            return False
        self._last[template] = now
        dropped = self._dropped.pop(template, 0)
        if dropped:
            # The arguments are merged into the text first, so the count cannot break formatting.
            record.msg = f"{record.getMessage()} ({dropped} similar lines dropped)"
            record.args = None
        return True


def install_repeat_filter() -> RepeatFilter:
    """Attach one ``RepeatFilter`` to the Kafka client loggers of this process, once."""
    for existing in logging.getLogger(CLIENT_LOGGERS[0]).filters:
        if isinstance(existing, RepeatFilter):
            return existing
    repeat_filter = RepeatFilter()
    for name in CLIENT_LOGGERS:
        logging.getLogger(name).addFilter(repeat_filter)
    return repeat_filter


class BrokerWatch:
    """Probe the bootstrap servers and log while none of them accepts a connection."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.down_since: float | None = None
        self._last_warning = 0.0

    async def run(self) -> None:
        """Probe every PROBE_INTERVAL_S seconds until cancelled."""
        while True:
            self.update(await reachable(self.bootstrap), time.monotonic())
            await asyncio.sleep(PROBE_INTERVAL_S)

    def update(self, is_reachable: bool, now: float) -> None:
        """Log the outcome of one probe taken at ``now`` (monotonic seconds)."""
        if is_reachable:
            if self.down_since is not None:
                logger.info(
                    "Kafka broker %s reachable again after %.0f s",
                    self.bootstrap,
                    now - self.down_since,
                )
            self.down_since = None
            return
        if self.down_since is None:
            self.down_since = now
        if now - self._last_warning >= WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(
                "Kafka broker %s unreachable for %.0f s; the worker's consumers, producers and "
                "offset commits retry with backoff and consumption resumes when it is back",
                self.bootstrap,
                now - self.down_since,
            )


async def reachable(bootstrap: str) -> bool:
    """Check whether any of the comma-separated ``host:port`` servers accepts a TCP connection."""
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            connect = asyncio.open_connection(host.strip("[]"), int(port))
            _, writer = await asyncio.wait_for(connect, PROBE_TIMEOUT_S)
        except (OSError, ValueError, TimeoutError):
            continue
        writer.close()
        return True
    return False
