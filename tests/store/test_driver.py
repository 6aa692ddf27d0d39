"""The trio psycopg adapter and pool on a real PostgreSQL."""

import pytest
import trio

from chatd import errors
from chatd.store import driver
from chatd.store.driver import Statement
from chatd.store.pool import open_pool


async def test_queries_and_parameters(pool):
    rows = await pool.fetch("SELECT %s::int + 1 AS n, %s::text AS t", (41, "héllo"))
    assert rows == [{"n": 42, "t": "héllo"}]


async def test_transaction_commits_and_rolls_back(pool):
    await pool.execute("CREATE TABLE t (x int)")
    async with pool.transaction() as conn:
        await conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError):
        async with pool.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (2)")
            raise RuntimeError("boom")
    assert await pool.fetch("SELECT x FROM t") == [{"x": 1}]


async def test_concurrent_use_of_the_pool(pool):
    results = []

    async def worker(i):
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT pg_sleep(0.05), %s::int AS i", (i,))
            results.append((await cur.fetchone())["i"])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(worker, i)
    assert sorted(results) == list(range(20))
    assert pool.in_use == 0


_ADD = Statement("test_add", "INSERT INTO n (x) VALUES ($1::int + 1) RETURNING x", [23])


async def test_a_prepared_statement_is_prepared_once_per_connection_and_runs_like_execute(pool):
    await pool.execute("CREATE TABLE n (x int PRIMARY KEY)")
    async with pool.connection() as conn:
        assert (await conn.run_statement(_ADD, [b"41"])).get_value(0, 0) == b"42"
        assert (await conn.run_statement(_ADD, [b"1"])).get_value(0, 0) == b"2"
        cur = await conn.execute("SELECT count(*) AS n FROM pg_prepared_statements WHERE name LIKE 'test_add%'")
        assert (await cur.fetchone())["n"] == 1
    # Autocommit: each run committed by itself; a failed run is a psycopg error,
    # mapped like any other by the pool, and the connection stays usable.
    with pytest.raises(errors.Conflict):
        async with pool.connection() as conn:
            await conn.run_statement(_ADD, [b"41"])
    async with pool.connection() as conn:
        assert (await conn.run_statement(_ADD, [b"99"])).get_value(0, 0) == b"100"
    assert await pool.fetch("SELECT x FROM n ORDER BY x") == [{"x": 2}, {"x": 42}, {"x": 100}]


async def test_a_prepared_statement_is_planned_again_once_it_is_old(pool, monkeypatch):
    # A plan made while a table is nearly empty scans it; PostgreSQL keeps that plan as the
    # table grows until the table's statistics change. Prepared again, it finds the index.
    # autovacuum off: only this test analyzes the table, so the stale plan is certain.
    await pool.execute("CREATE TABLE kv (k int PRIMARY KEY, v text) WITH (autovacuum_enabled = off)")
    await pool.execute("ANALYZE kv")
    lookup = Statement("test_lookup", "SELECT v FROM kv WHERE k = $1::int", [23])

    async def plan(conn):
        name = conn.statements[lookup.name][0].decode()
        cur = await conn.execute(f"EXPLAIN EXECUTE {name}(7)")
        return "\n".join(r["QUERY PLAN"] for r in await cur.fetchall())

    monkeypatch.setattr(driver, "REPREPARE_INTERVAL", 0.5)
    async with pool.connection() as conn:
        for _ in range(6):  # past the custom plans of the first five runs
            await conn.run_statement(lookup, [b"7"])
        await pool.execute("INSERT INTO kv SELECT g, 'x' FROM generate_series(1, 50000) g")
        assert "Seq Scan on kv" in await plan(conn)  # the plan made on the empty table
        await trio.sleep(0.6)
        assert (await conn.run_statement(lookup, [b"7"])).get_value(0, 0) == b"x"
        assert "Index Scan" in await plan(conn)
        cur = await conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'test_lookup%'")
        assert [r["name"] for r in await cur.fetchall()] == ["test_lookup_2"]  # the old one is gone


async def test_a_prepared_statement_inside_a_transaction_is_rolled_back_with_it(pool):
    await pool.execute("CREATE TABLE n (x int PRIMARY KEY)")
    with pytest.raises(RuntimeError):
        async with pool.transaction() as conn:
            await conn.run_statement(_ADD, [b"1"])
            raise RuntimeError("boom")
    assert await pool.fetch("SELECT count(*) AS n FROM n") == [{"n": 0}]


async def test_a_cancelled_prepared_statement_is_cancelled_on_the_server(pool):
    sleep = Statement("test_sleep", "SELECT pg_sleep($1::float8)", [701])
    with trio.fail_after(10):
        with trio.move_on_after(0.3) as scope:
            async with pool.connection() as conn:
                pid = conn.pgconn.backend_pid
                await conn.run_statement(sleep, [b"30"])
        assert scope.cancelled_caught
        rows = await pool.fetch(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s AND state = 'active' AND query LIKE %s",
            (pid, "%pg_sleep($1%"),
        )
        assert rows == [{"n": 0}]
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid == pid  # the same connection, still usable
            assert (await conn.run_statement(sleep, [b"0"])).ntuples == 1


async def test_cancel_mid_query_cancels_on_server_and_pool_stays_healthy(pool):
    with trio.fail_after(10):
        with trio.move_on_after(0.3) as scope:
            async with pool.connection() as conn:
                pid = conn.pgconn.backend_pid
                await conn.execute("SELECT pg_sleep(30)")
        assert scope.cancelled_caught
        # The server-side query is gone, not still sleeping.
        rows = await pool.fetch(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s AND state = 'active' AND query LIKE %s",
            (pid, "%pg_sleep(30)%"),
        )
        assert rows == [{"n": 0}]
        assert await pool.fetch("SELECT 1 AS ok") == [{"ok": 1}]


async def test_cancel_inside_transaction_rolls_back(pool):
    await pool.execute("CREATE TABLE t (x int)")
    with trio.fail_after(10):
        with trio.move_on_after(0.3):
            async with pool.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("SELECT pg_sleep(30)")
        assert await pool.fetch("SELECT count(*) AS n FROM t") == [{"n": 0}]


async def test_a_caller_cancelled_before_its_statement_sends_nothing(pool):
    await pool.execute("CREATE TABLE t (x int)")
    async with pool.connection() as conn:
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.execute("INSERT INTO t VALUES (1)")  # autocommit: it would commit if sent
        assert scope.cancelled_caught
    with trio.CancelScope() as scope:
        scope.cancel()
        async with pool.connection() as conn:
            await conn.execute("INSERT INTO t VALUES (2)")
    assert scope.cancelled_caught
    assert await pool.fetch("SELECT count(*) AS n FROM t") == [{"n": 0}]
    assert pool.in_use == 0


async def test_one_connection_used_by_two_tasks_runs_their_statements_one_at_a_time(pool):
    async with pool.connection() as conn:
        spans = []

        async def query(tag: int) -> None:
            cur = await conn.execute(
                "SELECT clock_timestamp() AS a, pg_sleep(0.2), clock_timestamp() AS b, %s::int AS tag", (tag,)
            )
            row = await cur.fetchone()
            spans.append((row["a"], row["b"], row["tag"]))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(query, 1)
                nursery.start_soon(query, 2)
        (a1, b1, _), (a2, b2, _) = sorted(spans)
        assert b1 <= a2, "the second statement started while the first ran"
        assert sorted(tag for *_, tag in spans) == [1, 2]


async def test_query_timeout_maps_to_timeout(pool):
    with trio.fail_after(10):
        with pytest.raises(errors.Timeout):
            async with pool.connection(timeout=0.2) as conn:
                await conn.execute("SELECT pg_sleep(5)")
        assert await pool.fetch("SELECT 1 AS ok") == [{"ok": 1}]


async def test_acquire_timeout_when_pool_exhausted(db_conninfo):
    async with open_pool(db_conninfo, size=1, acquire_timeout=0.2, connect_timeout=5, query_timeout=10) as pool:
        with trio.fail_after(10):
            async with pool.connection():
                with pytest.raises(errors.Unavailable, match="no database connection free"):
                    async with pool.connection():
                        pass


async def test_terminated_backend_is_replaced(pool):
    async with pool.connection() as conn:
        victim = conn.pgconn.backend_pid
    killer = await pool.dedicated()
    try:
        await killer.execute("SELECT pg_terminate_backend(%s)", (victim,))
    finally:
        await killer.close()
    with trio.fail_after(10):
        # The pooled connection is dead: at most one caller sees it fail, then
        # the pool opens a fresh one.
        outcomes = []
        for _ in range(2):
            try:
                outcomes.append(await pool.fetch("SELECT pg_backend_pid() AS pid"))
            except errors.Unavailable:
                outcomes.append("unavailable")
        assert outcomes[-1] != "unavailable"
        assert outcomes[-1][0]["pid"] != victim


async def test_unique_violation_maps_to_conflict(pool):
    await pool.execute("CREATE TABLE u (x int PRIMARY KEY)")
    await pool.execute("INSERT INTO u VALUES (1)")
    with pytest.raises(errors.Conflict):
        await pool.execute("INSERT INTO u VALUES (1)")


async def test_unreachable_database_is_unavailable():
    with trio.fail_after(10):
        with pytest.raises(errors.Unavailable):
            async with open_pool("host=127.0.0.1 port=1 user=x dbname=x", size=1, acquire_timeout=1, connect_timeout=2, query_timeout=2):
                pass


async def test_listen_notify_round_trip(pool):
    listener = await pool.dedicated()
    try:
        await listener.execute("LISTEN chatd_test")
        got = []

        async def receive():
            got.extend(await listener.receive_notifies())

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.sleep(0.05)
                await pool.execute("SELECT pg_notify('chatd_test', 'hello')")
        assert [(n.channel, n.payload) for n in got] == [("chatd_test", "hello")]
    finally:
        await listener.close()
