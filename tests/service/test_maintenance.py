"""The search index's pending list merged in the background (chatd.service.maintenance):
new messages' entries leave the pending list without any insert doing the merge, a
failed merge is counted and retried, and inserts never merge below the raised limit."""

from __future__ import annotations

import trio
from structlog.testing import capture_logs

from chatd.service.maintenance import SearchIndexMerges
from chatd.store.maintenance import SEARCH_INDEX


async def _pending_tuples(pool) -> int:
    """Entries in the index's pending list, read from its metapage (pageinspect)."""
    row = await pool.fetchone(f"SELECT n_pending_tuples AS n FROM gin_metapage_info(get_raw_page('{SEARCH_INDEX}', 0))")
    return row["n"]


async def _messages(pool, room: int, first_seq: int, count: int) -> None:
    await pool.execute(
        "INSERT INTO events (room_id, seq, kind, sender, body)"
        " SELECT %s, s, 'message', 'mt-owner', 'hello number ' || s || ' from the maintenance test'"
        " FROM generate_series(%s::bigint, %s::bigint) AS s",
        (room, first_seq, first_seq + count - 1),
    )


async def _room(pool) -> int:
    await pool.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
    await pool.execute("INSERT INTO users (id) VALUES ('mt-owner')")
    row = await pool.fetchone("INSERT INTO rooms (kind, title, created_by) VALUES ('group', 'mt', 'mt-owner') RETURNING id")
    return row["id"]


async def test_new_entries_leave_the_pending_list_through_the_background_merge(pool):
    # An autovacuum pass over events merges the list too; off, only the task can.
    await pool.execute("ALTER TABLE events SET (autovacuum_enabled = off)")
    room = await _room(pool)
    # 5,000 messages are 91 pending pages (0.7 MB): far below the migration's limit,
    # so no insert merges them itself and only the task can empty the list.
    await _messages(pool, room, 1, 5000)
    assert await _pending_tuples(pool) >= 5000
    merges = SearchIndexMerges(pool, interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(merges.serve)
        with trio.fail_after(10):
            while await _pending_tuples(pool):
                await trio.sleep(0.02)
        assert merges.pages > 0 and merges.failures == 0
        await _messages(pool, room, 5001, 100)  # later messages are merged by a later pass
        with trio.fail_after(10):
            while await _pending_tuples(pool):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    # The merged entries are in the index proper: a search through it finds them.
    await pool.execute("SET enable_seqscan = off")
    row = await pool.fetchone(
        "SELECT count(*) AS n FROM events WHERE search @@ to_tsquery('simple', '5100') AND kind = 'message' AND NOT deleted")
    assert row["n"] == 1


async def test_the_migration_raises_the_limit_at_which_an_insert_merges(pool):
    row = await pool.fetchone("SELECT reloptions FROM pg_class WHERE relname = %s", (SEARCH_INDEX,))
    assert "gin_pending_list_limit=8192" in row["reloptions"] and "fastupdate=on" in row["reloptions"]
    await pool.execute("ALTER TABLE events SET (autovacuum_enabled = off)")  # only an insert may merge
    room = await _room(pool)
    # 40,000 messages are 728 pending pages (5.8 MB): past PostgreSQL's default 4 MB
    # limit, at which the insert that crossed it would have merged the list itself.
    for first in range(1, 40001, 5000):
        await _messages(pool, room, first, 5000)
    assert await _pending_tuples(pool) == 40000


async def test_a_failed_merge_is_counted_logged_once_and_retried(pool):
    room = await _room(pool)
    await _messages(pool, room, 1, 50)
    merges = SearchIndexMerges(pool, interval=0.05)
    await pool.execute(f"ALTER INDEX {SEARCH_INDEX} RENAME TO events_search_away")
    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(merges.serve)
            with trio.fail_after(10):
                while merges.failures < 3:
                    await trio.sleep(0.02)
            await pool.execute(f"ALTER INDEX events_search_away RENAME TO {SEARCH_INDEX}")
            with trio.fail_after(10):
                while await _pending_tuples(pool):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    failed = [entry for entry in logs if entry["event"] == "search.merge_failed"]
    assert len(failed) == 1 and failed[0]["code"] == "internal", logs
    assert [entry["event"] for entry in logs if entry["event"] == "search.merge_recovered"] == ["search.merge_recovered"]
    assert merges.merges >= 1 and merges.pages >= 1
