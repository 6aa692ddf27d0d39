"""Migrations: ordered, recorded, idempotent, safe when processes race."""

import psycopg
import trio

from chatd.store.migrate import applied_version, available, migrate
from chatd.store.pool import open_pool


def _empty_db(pg_server, name):
    with psycopg.connect(pg_server.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return pg_server.conninfo(name)


async def test_fresh_database_migrates_to_latest_and_again_is_a_no_op(pg_server):
    dsn = _empty_db(pg_server, "mig_once")
    async with open_pool(dsn, size=2, acquire_timeout=5, connect_timeout=5, query_timeout=60) as pool:
        assert await applied_version(pool) == 0
        first = await migrate(pool)
        assert [m.version for m in first] == [m.version for m in available()]
        assert await migrate(pool) == []
        assert await applied_version(pool) == len(available())
        tables = {r["t"] for r in await pool.fetch("SELECT tablename AS t FROM pg_tables WHERE schemaname = 'public'")}
        assert {"users", "rooms", "members", "events", "reactions", "idempotency", "chatd_schema"} <= tables


async def test_concurrent_migrators_apply_each_migration_once(pg_server):
    dsn = _empty_db(pg_server, "mig_race")
    applied = []

    async def one_process():
        # Separate pools stand in for separate chatd processes.
        async with open_pool(dsn, size=1, acquire_timeout=30, connect_timeout=5, query_timeout=60) as pool:
            applied.extend(await migrate(pool))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one_process)
    assert sorted(m.version for m in applied) == [m.version for m in available()]
