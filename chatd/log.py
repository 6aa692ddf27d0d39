"""structlog set-up: JSON lines in production, readable console lines in development.

Code logs key-value events (``log.info("room.joined", room_id=...)``) and binds
``conn_id``/``user_id`` once per connection with ``log.bind``.
"""

from __future__ import annotations

import logging
import sys
import time

import structlog

from chatd.config import LogConfig


def configure(config: LogConfig, stream=None) -> None:
    """Route structlog (and the stdlib loggers of our dependencies) to ``stream``."""
    stream = stream or sys.stderr
    level = getattr(logging, config.level.upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if config.format == "json":
        renderer = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=[*shared, *renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # hypercorn and psycopg log through the stdlib; keep them quiet and on the same stream.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))


def get(name: str = "chatd", **bound):
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


class Repeats:
    """At most one log line per ``interval`` seconds for an event that can come in floods.

    Load shedding refuses commands by the thousand a second; a line each would cost the
    overloaded process ~12 µs apiece and flood the log. The first one logs at once; later
    ones inside the interval are only counted, and the next line that gets through carries
    that count as ``repeated`` (the exact totals are on /metrics).
    """

    __slots__ = ("logger", "level", "event", "interval", "next_at", "repeated")

    def __init__(self, logger, level: str, event: str, interval: float = 1.0) -> None:
        self.logger = logger  # resolved per line: structlog may be configured after import
        self.level = level
        self.event = event
        self.interval = interval
        self.next_at = 0.0
        self.repeated = 0

    def __call__(self, **fields) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.repeated += 1
            return
        self.next_at = now + self.interval
        repeated, self.repeated = self.repeated, 0
        getattr(self.logger, self.level)(self.event, repeated=repeated, **fields)
