"""Ordered plain-SQL migrations (chatd/store/migrations/NNNN_name.sql).

Each file runs in its own transaction and is recorded in ``chatd_schema``. A
session-level advisory lock serialises concurrent starters: the second process
waits, then finds nothing left to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import structlog

from chatd import errors
from chatd.store.pool import Pool

log = structlog.get_logger("chatd.store")

# Arbitrary constant: "chatd" in ASCII, used as the advisory lock key.
MIGRATION_LOCK = 0x6368617464


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with this chatd, in order. Raises Internal on a bad name."""
    found = []
    for entry in resources.files("chatd.store").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if not match:
            if entry.name.endswith(".sql"):
                raise errors.Internal(f"migration file with a bad name: {entry.name}")
            continue
        found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise errors.Internal("migration versions must be 1, 2, 3, ... without gaps")
    return found


async def applied_version(pool: Pool) -> int:
    row = await pool.fetchone("SELECT to_regclass('chatd_schema') IS NOT NULL AS present")
    if not row["present"]:
        return 0
    row = await pool.fetchone("SELECT coalesce(max(version), 0) AS v FROM chatd_schema")
    return row["v"]


async def migrate(pool: Pool, *, timeout: float = 300.0) -> list[Migration]:
    """Apply every pending migration; returns those applied by this call.

    Raises errors.Internal if the database is newer than this chatd, and the
    mapped database errors if a migration fails (that migration is rolled back).
    """
    wanted = available()
    done: list[Migration] = []
    async with pool.connection(timeout=timeout) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS chatd_schema ("
                " version int PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT coalesce(max(version), 0) AS v FROM chatd_schema")
            current = (await cur.fetchone())["v"]
            if current > len(wanted):
                raise errors.Internal(
                    f"database schema version {current} is newer than this chatd knows ({len(wanted)}): upgrade chatd"
                )
            for migration in wanted[current:]:
                async with conn.transaction():
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO chatd_schema (version, name) VALUES (%s, %s)", (migration.version, migration.name)
                    )
                log.info("db.migrated", version=migration.version, name=migration.name)
                done.append(migration)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return done
