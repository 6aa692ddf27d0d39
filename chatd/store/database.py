"""Open chatd's database: the configured PostgreSQL, or the embedded one.

Yields a :class:`Database` holding the pool and a description a person can read
in the start-up log. Migrations run here when ``database.migrate_on_start``.
"""

from __future__ import annotations

import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import structlog
from psycopg import sql

from chatd import errors
from chatd.config import DatabaseConfig
from chatd.store.embedded import EmbeddedServer, open_embedded_postgres
from chatd.store.migrate import migrate
from chatd.store.pool import Pool, open_pool

log = structlog.get_logger("chatd.store")

MIN_SERVER_VERSION = 140000


@dataclass
class Database:
    pool: Pool
    description: str
    embedded: EmbeddedServer | None


def _describe_url(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


async def ensure_database(admin: Pool, name: str) -> None:
    """CREATE DATABASE ``name`` unless it exists (embedded server only)."""
    row = await admin.fetchone("SELECT 1 AS present FROM pg_database WHERE datname = %s", (name,))
    if row is None:
        try:
            await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except errors.Conflict:
            pass  # another chatd process created it at the same moment


@asynccontextmanager
async def open_database(config: DatabaseConfig) -> AsyncIterator[Database]:
    """Start/connect, check the server version, migrate if configured.

    Raises errors.EmbeddedDatabaseError, errors.Unavailable, errors.Timeout,
    errors.StartupError (server too old).
    """
    pool_args = dict(
        size=config.pool_size,
        acquire_timeout=config.acquire_timeout,
        connect_timeout=config.connect_timeout,
        query_timeout=config.query_timeout,
    )
    if config.url:
        async with open_pool(config.url, **pool_args) as pool:
            yield await _ready(pool, config, _describe_url(config.url), None)
        return
    emb = config.embedded
    async with open_embedded_postgres(
        emb.state_dir, port=emb.port, run_as=emb.run_as, start_timeout=emb.start_timeout, stop_timeout=emb.stop_timeout
    ) as server:
        async with open_pool(server.conninfo("postgres"), **{**pool_args, "size": 1}) as admin:
            await ensure_database(admin, config.name)
        description = f"embedded PostgreSQL {server.url(config.name)} (data {server.data_dir})"
        async with open_pool(server.conninfo(config.name), **pool_args) as pool:
            yield await _ready(pool, config, description, server)


async def _ready(pool: Pool, config: DatabaseConfig, description: str, server: EmbeddedServer | None) -> Database:
    row = await pool.fetchone("SELECT current_setting('server_version_num')::int AS v")
    if row["v"] < MIN_SERVER_VERSION:
        raise errors.StartupError(f"PostgreSQL {row['v']} is too old: chatd needs 14 or newer")
    if config.migrate_on_start:
        await migrate(pool)
    return Database(pool=pool, description=description, embedded=server)
