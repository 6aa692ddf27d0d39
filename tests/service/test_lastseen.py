"""last_seen written behind disconnects (chatd.service.lastseen): batched, retried after a
failure, only moved forward, flushed when the service stops; and end to end through a
real server when many clients drop at once."""

from __future__ import annotations

import threading
import time

import psycopg
import trio
from structlog.testing import capture_logs

from chatd.service.lastseen import LastSeenWrites
from tests.service.conftest import db_fetch
from tests.wire import connect


async def _stored(pool, user_ids: list[str]) -> dict[str, float | None]:
    rows = await pool.fetch("SELECT id, extract(epoch FROM last_seen)::float8 AS seen FROM users WHERE id = ANY(%s)", (user_ids,))
    return {r["id"]: r["seen"] for r in rows}


async def _users(pool, *user_ids: str) -> None:
    await pool.execute("INSERT INTO users (id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (list(user_ids),))


async def test_moments_recorded_together_are_written_by_one_statement(pool):
    users = [f"ls-{i}" for i in range(250)]
    await _users(pool, *users)
    writes = LastSeenWrites(pool, timeout=5, max_batch=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(writes.serve)
        for i, user_id in enumerate(users):
            writes.record(user_id, 1_000_000.0 + i)
        with trio.fail_after(10):
            while writes.written < len(users):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert writes.statements == 3 and writes.failures == 0  # 100 + 100 + 50
    stored = await _stored(pool, users)
    assert all(abs(stored[u] - (1_000_000.0 + i)) < 1e-3 for i, u in enumerate(users)), stored


async def test_a_stored_moment_only_moves_forward_and_unknown_users_are_skipped(pool):
    await _users(pool, "ls-a")
    writes = LastSeenWrites(pool, timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(writes.serve)
        writes.record("ls-a", 2_000_000.0)
        writes.record("ls-a", 1_500_000.0)  # older than the one recorded: ignored
        writes.record("ls-nobody", 2_000_000.0)
        with trio.fail_after(10):
            while writes.written < 2:
                await trio.sleep(0.01)
        writes.record("ls-a", 1_000_000.0)  # older than the stored one (as if from another process)
        with trio.fail_after(10):
            while writes.written < 3:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert await _stored(pool, ["ls-a", "ls-nobody"]) == {"ls-a": 2_000_000.0}


async def test_a_failed_write_is_logged_and_retried_until_it_lands(pool, db_conninfo):
    await _users(pool, "ls-locked")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # another client holds the table, so the write times out
        with psycopg.connect(db_conninfo) as conn:
            conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(20)

    writes = LastSeenWrites(pool, timeout=0.3, retry_after=0.1)
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, hold_lock)
            await trio.to_thread.run_sync(locked.wait, 10)
            await nursery.start(writes.serve)
            writes.record("ls-locked", 3_000_000.0)
            with trio.fail_after(10):
                while writes.failures < 2:
                    await trio.sleep(0.01)
            assert writes.pending == 1 and writes.written == 0
            release.set()
            with trio.fail_after(10):
                while writes.written < 1:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    failed = [e for e in logs if e["event"] == "presence.last_seen_failed"]
    assert len(failed) >= 2 and failed[0]["users"] == 1 and failed[0]["log_level"] == "warning"
    assert await _stored(pool, ["ls-locked"]) == {"ls-locked": 3_000_000.0}


async def test_what_is_pending_when_the_service_stops_is_written(pool):
    await _users(pool, "ls-last")
    writes = LastSeenWrites(pool, timeout=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(writes.serve)
        nursery.cancel_scope.cancel()
        writes.record("ls-last", 4_000_000.0)  # recorded as the service is being stopped
    assert await _stored(pool, ["ls-last"]) == {"ls-last": 4_000_000.0}


async def test_clients_that_drop_together_all_get_last_seen_in_few_statements(chatd_server, db_conninfo):
    users = [f"drop{i}" for i in range(120)]
    before = time.time()
    async with trio.open_nursery() as nursery:
        stop = trio.Event()

        async def client(user_id: str, ready: trio.Semaphore) -> None:
            async with connect(chatd_server, user_id):
                ready.release()
                await stop.wait()

        ready = trio.Semaphore(0)
        for user_id in users:
            nursery.start_soon(client, user_id, ready)
        with trio.fail_after(30):
            for _ in users:
                await ready.acquire()
        stop.set()  # every client closes at once
    writes = chatd_server.service.last_seen
    with trio.fail_after(10):
        while True:
            rows = await db_fetch(db_conninfo, "SELECT extract(epoch FROM last_seen)::float8 FROM users WHERE id = ANY(%s)", users)
            if len(rows) == len(users) and all(r[0] is not None for r in rows):
                break
            await trio.sleep(0.05)
    assert all(before - 1 <= r[0] <= time.time() + 1 for r in rows)
    assert writes.failures == 0 and writes.statements < len(users) // 4, writes.statements


async def test_a_write_cancelled_as_the_service_stops_is_retried_by_the_final_flush(pool, db_conninfo):
    await _users(pool, "ls-stopping")
    locked, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with psycopg.connect(db_conninfo) as conn:
            conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(20)

    writes = LastSeenWrites(pool, timeout=5)
    async with trio.open_nursery() as outer:
        outer.start_soon(trio.to_thread.run_sync, hold_lock)
        await trio.to_thread.run_sync(locked.wait, 10)
        async with trio.open_nursery() as nursery:
            await nursery.start(writes.serve)
            writes.record("ls-stopping", 5_000_000.0)
            with trio.fail_after(10):
                while writes.pending:  # taken out: its write waits on the lock
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            threading.Timer(0.3, release.set).start()  # the lock goes while the service stops
            nursery.cancel_scope.cancel()
    assert writes.failures == 0 and writes.written == 1
    assert await _stored(pool, ["ls-stopping"]) == {"ls-stopping": 5_000_000.0}
