"""Read state and reading the log: mark_read + receipts, history paging, sync
(docs/protocol.md §4 "Reading the log", §5.2, §9)."""

from __future__ import annotations

from functools import partial

import trio

from chatd.service.shared import SharedReads
from chatd.store import reads
from tests.service.conftest import cid, clients, group, register, send, silent, until_seq
from tests.wire import connect

SYNC_ROOM_KEYS = {"room_id", "events", "has_more", "too_far_behind"}


def _seqs(events):
    return [e["seq"] for e in events]


async def _summary(server, user, room_id):
    async with connect(server, user) as w:
        [summary] = [r for r in w.welcome["rooms"] if r["room_id"] == room_id]
        return summary


async def test_unread_counts_messages_by_others_after_read_seq(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        await send(a, rid, "mine")  # 4: alice's own, never unread for her
        for body in ("one", "two", "three"):
            await send(b, rid, body)  # 5, 6, 7
        assert (await _summary(chatd_server, "alice", rid))["unread"] == 3
        assert (await _summary(chatd_server, "bob", rid))["unread"] == 1
        await b.call("delete", room_id=rid, seq=6, client_id=cid())
        assert (await _summary(chatd_server, "alice", rid))["unread"] == 3  # deleted ones still count
        await a.call("mark_read", room_id=rid, seq=6)
        summary = await _summary(chatd_server, "alice", rid)
        assert (summary["read_seq"], summary["unread"], summary["last_seq"]) == (6, 1, 8)


async def test_mark_read_is_monotonic_clamped_and_sends_receipts_to_others(chatd_server):
    async with clients(chatd_server, "alice", "alice", "bob") as (a1, a2, b):
        room = await group(a1, ["bob"])
        rid = room["room_id"]
        for body in ("one", "two", "three"):
            await send(b, rid, body)  # seqs 4, 5, 6

        marked = await a1.call("mark_read", room_id=rid, seq=5)
        assert set(marked) == {"type", "id", "read_seq"} and marked["read_seq"] == 5
        for w in (b, a2):  # the other members and alice's other connection
            receipt = await w.next_of("receipt")
            assert receipt == {"type": "receipt", "room_id": rid, "user_id": "alice", "read_seq": 5}
        await silent(a1, 0.4, "receipt")  # not the connection that marked

        assert (await a1.call("mark_read", room_id=rid, seq=3))["read_seq"] == 5  # never backwards
        assert (await a1.call("mark_read", room_id=rid, seq=5))["read_seq"] == 5
        assert (await a1.call("mark_read", room_id=rid, seq=1000))["read_seq"] == 6  # clamped to the end
        receipt = await b.next_of("receipt")
        assert receipt["read_seq"] == 6  # one receipt: the no-ops sent none
        await silent(b, 0.4, "receipt")

        summary = await _summary(chatd_server, "alice", rid)
        assert (summary["read_seq"], summary["unread"]) == (6, 0)
        assert (await a1.error("mark_read", room_id=999999, seq=1))["code"] == "not_found"


async def test_history_pages_in_both_directions_and_stops_at_joined_seq(chatd_server):
    await register(chatd_server, "carol")
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        for i in range(10):
            await send(a, rid, f"m{i}")  # seqs 4..13

        async def page(w=b, **q):
            result = await w.call("history", room_id=rid, **q)
            assert set(result) == {"type", "id", "events", "has_more"}
            return _seqs(result["events"]), result["has_more"]

        assert await page() == (list(range(1, 14)), False)
        assert await page(limit=3) == ([11, 12, 13], True)
        assert await page(before=11, limit=3) == ([8, 9, 10], True)
        assert await page(before=4, limit=5) == ([1, 2, 3], False)
        assert await page(after=10, limit=2) == ([11, 12], True)
        assert await page(after=11) == ([12, 13], False)
        assert await page(after=13) == ([], False)
        assert await page(after=4, before=9, limit=2) == ([5, 6], True)
        assert await page(after=4, before=9, limit=10) == ([5, 6, 7, 8], False)
        assert await page(limit=10**9) == (list(range(1, 14)), False)  # clamped, not an error
        # paging backwards to the start loses nothing and repeats nothing
        seen, before, more = [], None, True
        while more:
            got, more = await page(limit=4, **({"before": before} if before else {}))
            seen = got + seen
            before = got[0]
        assert seen == list(range(1, 14))

        assert (await b.call("history", room_id=rid, limit=1))["events"][0] == (await until_seq(b, rid, 13))[-1]

        added = await a.call("add_member", room_id=rid, user_id="carol", client_id=cid())  # seq 14
        await send(a, rid, "welcome carol")  # 15
        async with connect(chatd_server, "carol") as c:
            assert await page(c) == ([14, 15], False)
            assert await page(c, before=14) == ([], False)
            assert await page(c, after=0) == ([14, 15], False)
            assert await page(c, after=2, before=15) == ([14], False)
            assert c.welcome["rooms"][0]["joined_seq"] == added["seq"]
        async with connect(chatd_server, "dave") as d:
            assert (await d.error("history", room_id=rid))["code"] == "not_found"
        assert (await b.error("history", room_id=999999))["code"] == "not_found"


async def test_sync_nothing_new_paging_added_and_removed(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        for i in range(7):
            await send(a, rid, f"m{i}")  # 4..10
        quiet = await group(a, ["bob"], title="quiet")
        gone = await group(a, ["bob"], title="gone")
        await b.call("leave", room_id=gone["room_id"], client_id=cid())

        nothing = await b.call("sync", rooms={rid: 10, quiet["room_id"]: 3})
        assert (nothing["rooms"], nothing["removed"], nothing["added"]) == ([], [], [])

        synced, have = [], 2
        while True:
            result = await b.call("sync", rooms={rid: have, quiet["room_id"]: 3}, limit=3)
            [entry] = result["rooms"]
            assert set(entry) == SYNC_ROOM_KEYS and entry["room_id"] == rid and entry["too_far_behind"] is False
            synced += entry["events"]
            have = entry["events"][-1]["seq"]
            if not entry["has_more"]:
                break
        assert _seqs(synced) == list(range(3, 11))
        assert [e["data"].get("body") for e in synced[1:]] == [f"m{i}" for i in range(7)]

        result = await b.call("sync", rooms={rid: 10, gone["room_id"]: 3, 999999: 5})
        assert sorted(result["removed"]) == [gone["room_id"], 999999] and result["rooms"] == []
        assert [r["room_id"] for r in result["added"]] == [quiet["room_id"]]
        [added] = result["added"]
        assert (added["kind"], added["title"], added["role"], added["last_seq"], added["joined_seq"]) == ("group", "quiet", "member", 3, 1)

        fresh = await b.call("sync", rooms={})
        assert sorted(r["room_id"] for r in fresh["added"]) == [rid, quiet["room_id"]]


async def test_sync_too_far_behind_or_beyond_the_end_gets_a_snapshot(make_server):
    server = await make_server(limits={"retention_events": 10, "sync_page_max": 4})
    async with clients(server, "alice", "bob") as (a, b):
        assert a.welcome["limits"]["sync_gap_max"] == 10 and a.welcome["limits"]["sync_page_max"] == 4
        room = await group(a, ["bob"], title="busy")
        rid = room["room_id"]
        for i in range(12):
            await send(a, rid, f"m{i}")  # 4..15

        near = await b.call("sync", rooms={rid: 5})  # 10 behind: still the gap itself
        assert _seqs(near["rooms"][0]["events"]) == [6, 7, 8, 9] and near["rooms"][0]["too_far_behind"] is False

        for claimed in (4, 99):  # 11 behind; past the end (e.g. after a restore)
            result = await b.call("sync", rooms={rid: claimed})
            [entry] = result["rooms"]
            assert entry["too_far_behind"] is True and entry["events"] == [] and entry["has_more"] is False
            snap = entry["snapshot"]
            assert set(snap) == {"room", "members", "last_seq", "latest"}
            assert snap["last_seq"] == 15 and snap["room"]["room_id"] == rid and snap["room"]["title"] == "busy"
            assert snap["room"]["member_count"] == 2
            assert sorted((m["user_id"], m["role"]) for m in snap["members"]) == [("alice", "owner"), ("bob", "member")]
            assert all(isinstance(m["joined_at"], float) for m in snap["members"])
            assert _seqs(snap["latest"]) == [12, 13, 14, 15]
            assert snap["latest"][-1]["data"] == {"body": "m11"}


async def test_sync_pages_carry_current_state_like_history_across_several_rooms(make_server):
    # sync reads summaries, pages and reactions in one statement: each listed room gets
    # exactly what history shows for the same range, whatever state its messages are in.
    server = await make_server(limits={"retention_events": 20})
    async with clients(server, "alice", "bob", "carol") as (a, b, c):
        room = await group(a, ["bob", "carol"])
        rid = room["room_id"]
        first = await send(a, rid, "first")
        second = await send(b, rid, "second")
        third = await send(c, rid, "third")
        for user, emoji in ((b, "👍"), (c, "🎉"), (a, "👍"), (c, "👍")):
            await user.call("react", room_id=rid, seq=first["seq"], emoji=emoji, client_id=cid())
        await b.call("edit", room_id=rid, seq=second["seq"], body="second, edited", client_id=cid())
        await c.call("react", room_id=rid, seq=third["seq"], emoji="👀", client_id=cid())
        await c.call("delete", room_id=rid, seq=third["seq"], client_id=cid())
        other = await group(a, ["bob"], title="other")
        far = await group(a, ["bob"], title="far")
        for i in range(25):
            await send(a, far["room_id"], f"f{i}")
        last = (await send(a, rid, "last"))["seq"]

        history = (await b.call("history", room_id=rid, after=first["seq"] - 1, limit=50))["events"]
        synced = await b.call(
            "sync", rooms={rid: first["seq"] - 1, other["room_id"]: other["last_seq"], far["room_id"]: 1}, limit=50
        )
        by_room = {r["room_id"]: r for r in synced["rooms"]}
        assert set(by_room) == {rid, far["room_id"]}  # nothing new in "other"
        assert by_room[rid]["events"] == history and by_room[rid]["has_more"] is False
        assert _seqs(history) == list(range(first["seq"], last + 1))
        reactions = history[0]["data"]["reactions"]
        assert list(reactions.items()) == [("👍", ["bob", "alice", "carol"]), ("🎉", ["carol"])]
        assert history[1]["data"] == {"body": "second, edited", "edited": True}
        assert history[2]["data"] == {"deleted": True}
        assert by_room[far["room_id"]]["too_far_behind"] is True  # 27 behind with a gap of 20
        assert synced["removed"] == [] and synced["added"] == []

        paged = await b.call("sync", rooms={rid: first["seq"] - 1}, limit=2)
        [entry] = paged["rooms"]
        assert entry["events"] == history[:2] and entry["has_more"] is True


async def _sync_world(a, b, c, d):
    """Three rooms with different members and lengths; returns their ids."""
    r1 = (await group(a, ["bob", "carol"], title="r1"))["room_id"]
    r2 = (await group(b, ["carol", "dave"], title="r2"))["room_id"]
    r3 = (await group(d, ["alice"], title="r3"))["room_id"]
    for i in range(6):
        await send(a, r1, f"r1-{i}")
        await send(c, r2, f"r2-{i}")
    await send(d, r3, "r3-0")
    await send(a, r3, "r3-1")
    return r1, r2, r3


async def test_syncs_sent_together_each_get_exactly_their_own_answer(chatd_server):
    # Concurrent syncs are answered by shared statements; whoever shares one must still
    # get what it would get alone: its own rooms, from its own seqs, in its own page size.
    users = ("alice", "bob", "carol", "dave", "alice", "carol")
    async with clients(chatd_server, *users) as wires:
        a, b, c, d = wires[:4]
        r1, r2, r3 = await _sync_world(a, b, c, d)
        asks = [
            {"rooms": {r1: 2, r3: 0}, "limit": 50},
            {"rooms": {r1: 1, r2: 3}, "limit": 2},
            {"rooms": {r1: 0, r2: 0, 999_999: 0}, "limit": 3},  # 999999: not a room of carol's
            {"rooms": {r2: 1}, "limit": 50},  # r3 is listed as added
            {"rooms": {r1: 5}, "limit": 1},
            {"rooms": {r1: 9, r2: 4}, "limit": 4},
        ]
        alone = [await wire.call("sync", **ask) for wire, ask in zip(wires, asks)]
        assert alone[2]["removed"] == [999_999] and [r["room_id"] for r in alone[3]["added"]] == [r3]
        assert alone[3]["added"][0]["unread"] == 1  # an added room's summary is whole: alice's message
        assert [len(r["events"]) for r in alone[1]["rooms"]] == [2, 2] and all(r["has_more"] for r in alone[1]["rooms"])
        for _ in range(5):
            together: list = [None] * len(wires)

            async def one(i):
                together[i] = await wires[i].call("sync", **asks[i])

            async with trio.open_nursery() as nursery:
                for i in range(len(wires)):
                    nursery.start_soon(one, i)
            assert [{k: v for k, v in r.items() if k != "id"} for r in together] == [
                {k: v for k, v in r.items() if k != "id"} for r in alone]


async def test_syncs_queued_during_a_read_share_the_next_statement(chatd_server):
    async with clients(chatd_server, "alice", "bob", "carol", "dave") as (a, b, c, d):
        r1, r2, r3 = await _sync_world(a, b, c, d)
    requests = [("alice", {r1: 0, r3: 0}, 50), ("bob", {r1: 3, r2: 0}, 2), ("carol", {r2: 5}, 50), ("dave", {}, 50),
                ("alice", {r1: 6}, 50), ("nobody", {r1: 0}, 50)]
    pool = chatd_server.service.pool
    alone = [await reads.sync_pages(pool, user, haves, limit=limit) for user, haves, limit in requests]
    syncs = SharedReads(partial(reads.sync_pages_many, pool), what="syncs")
    got: list = [None] * len(requests)

    async def one(i):
        got[i] = await syncs.read(requests[i])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as readers:
                for i in range(len(requests)):
                    readers.start_soon(one, i)
                await trio.sleep(0.01)  # all queued before the first read: one statement
                await nursery.start(syncs.serve)
            nursery.cancel_scope.cancel()
    assert syncs.statements == 1 and syncs.answered == len(requests)
    assert got == alone
    assert got[5] == ([], {})  # a user in no room
    assert [(len(events), more) for events, more in got[1][1].values()] == [(2, True), (2, True)]
