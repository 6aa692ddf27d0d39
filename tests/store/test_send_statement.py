"""The statement that commits a batch of sends, on its own: how it reaches rooms and
in which order it locks them."""

import json

import trio

from chatd.store import mutations as mu


def _batch(*sends):
    """The statement's one parameter: (ord, room_id, user_id, body, reply_to, client_id) rows."""
    return [json.dumps([[k, room, user, "hi", None, cid] for k, (room, user, cid) in enumerate(sends)]).encode()]


async def _dm_rooms(pool, n):
    """``n`` rooms of two (u{2i}, u{2i+1}); returns their ids in creation order."""
    await pool.execute("INSERT INTO users (id) SELECT 'u' || g FROM generate_series(0, %s) g", (2 * n - 1,))
    rows = await pool.fetch(
        "INSERT INTO rooms (kind, dm_key, created_by) SELECT 'dm', 'k' || g, 'u' || (2 * g)"
        " FROM generate_series(0, %s) g RETURNING id", (n - 1,))
    ids = [r["id"] for r in rows]
    await pool.execute(
        "INSERT INTO members (room_id, user_id, role, joined_seq)"
        " SELECT (%s::bigint[])[g / 2 + 1], 'u' || g, 'member', 1 FROM generate_series(0, %s) g",
        (ids, 2 * n - 1))
    return ids


async def test_the_send_statement_reaches_rooms_by_key_whatever_their_number(pool):
    # The statement runs on a generic plan that cannot see how few rooms a batch names.
    # Joined to the batch, rooms were reached by a scan of every room, twice per batch,
    # once there were a few thousand of them.
    await _dm_rooms(pool, 5000)
    await pool.execute("ANALYZE rooms")
    rows = await pool.fetch("EXPLAIN (GENERIC_PLAN) " + mu._SEND.sql.decode())
    plan = "\n".join(r["QUERY PLAN"] for r in rows)
    assert "on rooms" in plan
    assert "Seq Scan on rooms" not in plan, plan


async def test_a_batch_locks_its_rooms_in_key_order(pool):
    low, high = await _dm_rooms(pool, 2)
    # An update of an indexed column moves the low room's row, and its index entries,
    # after the high one's: an order other than the key's now comes from the table's.
    await pool.execute("UPDATE rooms SET dm_key = dm_key || 'x' WHERE id = %s", (low,))
    waiting = trio.Event()
    done = []

    async def second_batch():
        # Names the high room first; it must wait for the low one without holding the high one.
        async with pool.connection() as conn:
            pid = conn.pgconn.backend_pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signal_when_waiting, pool, pid, waiting)
                result = await conn.run_statement(mu._SEND, _batch((high, "u2", "b1"), (low, "u0", "b2")))
            done.append(json.loads(result.get_value(0, 0)))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with pool.transaction() as tx:
                await tx.run_statement(mu._SEND, _batch((low, "u1", "a1")))
                nursery.start_soon(second_batch)
                await waiting.wait()
                # Had the waiting batch taken the high room first, this is a deadlock.
                await tx.run_statement(mu._SEND, _batch((high, "u3", "a2")))
    assert [[ord_, seq] for ord_, _, _, seq, _ in sorted(done[0])] == [[0, 2], [1, 2]]
    rows = await pool.fetch("SELECT room_id, seq, sender FROM events ORDER BY room_id, seq")
    assert [(r["room_id"], r["seq"], r["sender"]) for r in rows] == [
        (low, 1, "u1"), (low, 2, "u0"), (high, 1, "u3"), (high, 2, "u2")]


async def _signal_when_waiting(pool, pid, event):
    """Set ``event`` once backend ``pid`` waits for a row lock."""
    while True:
        row = await pool.fetchone("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        if row and row["wait_event_type"] == "Lock":
            event.set()
            return
        await trio.sleep(0.01)
