"""structlog set-up: JSON lines in production, readable console lines in development.

Code logs key-value events (``log.info("room.joined", room_id=...)``) and binds
``conn_id``/``user_id`` once per connection with ``log.bind``.
"""

from __future__ import annotations

import logging
import sys

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
