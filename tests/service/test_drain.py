"""Shutdown drains (DESIGN.md §3.8, docs/protocol.md §5.3 goaway, §7 close 4009):
clients are told to reconnect elsewhere, and queued writes are committed first."""

from __future__ import annotations

import time

import psycopg
import trio

from chatd.store import mutations as mu
from tests.conftest import start_server
from tests.service.conftest import cid, clients, db_fetch, frames_until_closed, group


async def _hold_room_lock(conninfo: str, room_id: int, seconds: float, locked: trio.Event) -> None:
    """Keep the room's row locked for a while: a slow database, as the writer sees it."""

    def hold() -> None:
        with psycopg.connect(conninfo) as conn:
            conn.execute("SELECT 1 FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
            trio.from_thread.run_sync(locked.set)
            time.sleep(seconds)
            conn.commit()

    await trio.to_thread.run_sync(hold)


async def test_stop_sends_goaway_then_4009_and_commits_queued_writes(tmp_path, db_conninfo):
    queued_results = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await start_server(nursery, tmp_path, db_conninfo, server={"shutdown_grace": 5.0})
            async with clients(server, "alice", "bob") as (a, b):
                room = await group(a, ["bob"])
                rid = room["room_id"]
                locked = trio.Event()
                nursery.start_soon(_hold_room_lock, db_conninfo, rid, 1.0, locked)
                await locked.wait()
                # Pipelined sends; the ping's reply proves the server read them all. They
                # cannot commit yet: the room is locked.
                for i in range(40):
                    await a.send("send", room_id=rid, client_msg_id=cid(), body=f"wire {i}")
                await a.call("ping")
                # More writes queued straight on the writer as the stop begins.
                for i in range(40):
                    mutation = mu.Send(user_id="bob", client_id=cid("q"), room_id=rid, body=f"queued {i}")
                    mutation.on_done = lambda result, error: queued_results.append((result, error))
                    server.service.writer.submit(mutation)
                server.request_stop()

                for w in (a, b):
                    frames, code, reason = await frames_until_closed(w)
                    goaways = [f for f in frames if f["type"] == "goaway"]
                    assert len(goaways) == 1, frames
                    assert isinstance(goaways[0]["reason"], str) and goaways[0]["reconnect_after_ms"] >= 0
                    assert (code, reason) == (4009, "resume: sync")
                assert queued_results == []  # closed before the writes could commit
        # serve() returned: everything it accepted is in the database.
    assert len(queued_results) == 40 and all(error is None for _, error in queued_results), queued_results
    rows = await db_fetch(db_conninfo, "SELECT seq, body FROM events WHERE room_id = %s AND kind = 'message' ORDER BY seq", rid)
    assert sorted(body for _, body in rows) == sorted([f"wire {i}" for i in range(40)] + [f"queued {i}" for i in range(40)])
    assert [seq for seq, _ in rows] == list(range(4, 84))  # gapless


async def test_a_restarted_server_serves_what_the_drained_one_acked(tmp_path, db_conninfo):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, tmp_path, db_conninfo)
        async with clients(server, "alice") as (a,):
            room = await group(a, title="kept")
            sent = await a.call("send", room_id=room["room_id"], client_msg_id=cid(), body="before the restart")
            server.request_stop()
            assert (await frames_until_closed(a))[1] == 4009
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, tmp_path, db_conninfo)
        async with clients(server, "alice") as (a,):
            [summary] = a.welcome["rooms"]
            assert summary["last_seq"] == sent["seq"]
            synced = await a.call("sync", rooms={room["room_id"]: sent["seq"] - 1})
            assert synced["rooms"][0]["events"][0]["data"] == {"body": "before the restart"}
        server.request_stop()
