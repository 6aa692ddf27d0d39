"""The promises users rely on (DESIGN.md §3, docs/protocol.md §8–§10), over real
sockets: durable before ack, one gapless log per room, idempotent retries (also
across a restart), recovery by sync, visibility, isolation of failures."""

from __future__ import annotations

import trio

from chatd.protocol import messages as m
from chatd.service import commands
from chatd.store import membership as ms
from tests.conftest import start_server
from tests.service.conftest import cid, clients, db_fetch, group, register, send, silent, still_works, until_seq
from tests.wire import connect


async def test_an_acked_change_is_already_committed(chatd_server, db_conninfo):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        rids = [await a.send("send", room_id=rid, client_msg_id=cid(), body=f"n{i}") for i in range(30)]
        for i, request in enumerate(rids):
            ack = await a.reply(request)
            rows = await db_fetch(db_conninfo, "SELECT kind, sender, body FROM events WHERE room_id = %s AND seq = %s", rid, ack["seq"])
            assert rows == [("message", "alice", f"n{i}")], (i, ack)

        target = (await a.reply(await a.send("edit", room_id=rid, seq=4, body="changed", client_id=cid())))["seq"]
        assert await db_fetch(db_conninfo, "SELECT body, edited FROM events WHERE room_id = %s AND seq = 4", rid) == [("changed", True)]
        assert await db_fetch(db_conninfo, "SELECT kind FROM events WHERE room_id = %s AND seq = %s", rid, target) == [("edited",)]
        await b.call("react", room_id=rid, seq=5, emoji="✅", client_id=cid())
        assert await db_fetch(db_conninfo, "SELECT user_id FROM reactions WHERE room_id = %s AND seq = 5", rid) == [("bob",)]
        other = (await a.call("create_group", title="t", members=["bob"], client_id=cid()))["room"]
        assert await db_fetch(db_conninfo, "SELECT title, last_seq FROM rooms WHERE id = %s", other["room_id"]) == [("t", 3)]
        await b.call("mark_read", room_id=rid, seq=10)
        assert await db_fetch(db_conninfo, "SELECT read_seq FROM members WHERE room_id = %s AND user_id = 'bob'", rid) == [(10,)]


async def test_concurrent_senders_get_gapless_seqs_and_everyone_sees_them_in_order(chatd_server, db_conninfo):
    per_connection = 25
    users = ["alice", "alice", "bob", "bob", "carol", "carol"]
    async with clients(chatd_server, *users) as senders, clients(chatd_server, "dave") as (watcher,):
        room = await group(senders[0], ["bob", "carol", "dave"])
        rid, first = room["room_id"], room["last_seq"] + 1
        acked: dict[int, list[int]] = {}

        async def flood(i, w):
            requests = [await w.send("send", room_id=rid, client_msg_id=cid(f"w{i}"), body=f"{i}:{n}") for n in range(per_connection)]
            acked[i] = [(await w.reply(r))["seq"] for r in requests]

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i, w in enumerate(senders):
                    nursery.start_soon(flood, i, w)

        last = first + per_connection * len(senders) - 1
        everything = sorted(s for seqs in acked.values() for s in seqs)
        assert everything == list(range(first, last + 1))  # gapless, no seq given twice
        for seqs in acked.values():  # one connection's sends take effect in the order sent
            assert seqs == sorted(seqs)

        bodies = {}
        for w in [*senders, watcher]:
            live = [e for e in await until_seq(w, rid, last) if e["seq"] >= first]
            assert [e["seq"] for e in live] == list(range(first, last + 1))  # in seq order, nothing missing
            for e in live:
                assert bodies.setdefault(e["seq"], e["data"]["body"]) == e["data"]["body"]
        for i, seqs in acked.items():  # each ack names the message that was sent
            assert [bodies[s] for s in seqs] == [f"{i}:{n}" for n in range(per_connection)]
        stored = await db_fetch(db_conninfo, "SELECT seq FROM events WHERE room_id = %s ORDER BY seq", rid)
        assert [s for (s,) in stored] == list(range(1, last + 1))


async def test_retries_with_the_same_client_id_return_the_original_result(chatd_server):
    await register(chatd_server, "carol", "dave")
    async with clients(chatd_server, "alice", "alice", "bob") as (a, a2, b):
        created = await a.call("create_group", title="ops", members=["bob"], client_id="g-1")
        rid = created["room"]["room_id"]
        await until_seq(b, rid, 3)
        assert (await a2.call("create_group", title="ops", members=["bob"], client_id="g-1"))["room"] == created["room"]
        dm = await a.call("create_dm", user_id="dave", client_id="dm-1")
        assert (await a.call("create_dm", user_id="dave", client_id="dm-1"))["room"] == dm["room"]

        first = await a.call("send", room_id=rid, client_msg_id="m-1", body="once")
        assert first["duplicate"] is False
        for w in (a, a2):  # any connection of the same user
            again = await w.call("send", room_id=rid, client_msg_id="m-1", body="once")
            assert (again["seq"], again["at"], again["duplicate"]) == (first["seq"], first["at"], True)
        twins = [await a.send("send", room_id=rid, client_msg_id="m-2", body="twice") for _ in range(2)]  # one batch
        twins = [await a.reply(r) for r in twins]
        assert twins[0]["seq"] == twins[1]["seq"] and sorted(t["duplicate"] for t in twins) == [False, True]
        bobs = await b.call("send", room_id=rid, client_msg_id="m-1", body="mine")  # keys are per user
        assert bobs["duplicate"] is False and bobs["seq"] != first["seq"]

        target = first["seq"]
        steps = [
            (a, "edit", {"room_id": rid, "seq": target, "body": "edited", "client_id": "e-1"}),
            (b, "react", {"room_id": rid, "seq": target, "emoji": "👍", "client_id": "r-1"}),
            (b, "unreact", {"room_id": rid, "seq": target, "emoji": "👍", "client_id": "u-1"}),
            (a, "add_member", {"room_id": rid, "user_id": "carol", "client_id": "add-1"}),
            (a, "set_role", {"room_id": rid, "user_id": "carol", "role": "admin", "client_id": "role-1"}),
            (a, "remove_member", {"room_id": rid, "user_id": "carol", "client_id": "rm-1"}),
            (a, "update_room", {"title": "ops2", "room_id": rid, "client_id": "up-1"}),
            (a, "delete", {"room_id": rid, "seq": bobs["seq"] - 1, "client_id": "del-1"}),
            (b, "leave", {"room_id": rid, "client_id": "leave-1"}),
        ]
        public = await group(a, title="lobby", public=True)
        steps.append((b, "join", {"room_id": public["room_id"], "client_id": "join-1"}))
        for w, command, fields in steps:
            original = await w.call(command, **fields)
            retried = await w.call(command, **fields)
            assert {k: v for k, v in retried.items() if k != "id"} == {k: v for k, v in original.items() if k != "id"}, command

        # nothing new in the log: the last event is still the last original one
        newest = (await a.call("history", room_id=rid, limit=1))["events"][0]
        assert newest["kind"] == "member_left" and newest["data"]["user_id"] == "bob"
        hist = await a.call("history", room_id=rid)
        kinds = [e["kind"] for e in hist["events"]]
        assert kinds.count("message") == 3 and kinds.count("edited") == 1 and kinds.count("room_updated") == 1
        async with connect(chatd_server, "alice") as fresh:
            assert len(fresh.welcome["rooms"]) == 3  # ops, the DM, lobby: nothing created twice

        # only successes are remembered: a failed command may be retried with its id
        assert (await a.error("react", room_id=rid, seq=999, emoji="🔁", client_id="r-9"))["code"] == "not_found"
        await a.call("react", room_id=rid, seq=target, emoji="🔁", client_id="r-9")


async def test_idempotency_survives_a_server_restart(tmp_path, db_conninfo):
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, tmp_path, db_conninfo)
        async with clients(server, "alice", "bob") as (a, b):
            room = (await a.call("create_group", title="r", members=["bob"], client_id="keep-g"))["room"]
            sent = await a.call("send", room_id=room["room_id"], client_msg_id="keep-m", body="durable")
            reacted = await b.call("react", room_id=room["room_id"], seq=sent["seq"], emoji="💾", client_id="keep-r")
        server.request_stop()

    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, tmp_path, db_conninfo)
        async with clients(server, "alice", "bob") as (a, b):
            again = (await a.call("create_group", title="r", members=["bob"], client_id="keep-g"))["room"]
            assert again == room
            resent = await a.call("send", room_id=room["room_id"], client_msg_id="keep-m", body="durable")
            assert (resent["seq"], resent["at"], resent["duplicate"]) == (sent["seq"], sent["at"], True)
            assert (await b.call("react", room_id=room["room_id"], seq=sent["seq"], emoji="💾", client_id="keep-r"))["seq"] == reacted["seq"]
            hist = await a.call("history", room_id=room["room_id"])
            assert [e["seq"] for e in hist["events"]] == list(range(1, reacted["seq"] + 1))
            assert len(a.welcome["rooms"]) == 1
        server.request_stop()


async def test_a_reconnecting_client_syncs_exactly_what_it_missed(make_server):
    server = await make_server(limits={"sync_page_max": 5})
    await register(server, "carol", "dave")
    async with clients(server, "alice", "bob") as (a, b):
        room = await group(a, ["bob", "dave"])
        rid = room["room_id"]
        gone = await group(a, ["bob"], title="gone")
        for body in ("one", "two", "three"):
            await send(a, rid, body)  # 5, 6, 7
        held = await until_seq(b, rid, 7)
        last_held = held[-1]["seq"]

    async with clients(server, "alice") as (a,):
        missed_ops = []
        for i in range(6):
            missed_ops.append(await send(a, rid, f"missed {i}"))
        await a.call("edit", room_id=rid, seq=6, body="two (edited)", client_id=cid())
        await a.call("edit", room_id=rid, seq=missed_ops[0]["seq"], body="missed 0 (edited)", client_id=cid())
        await a.call("delete", room_id=rid, seq=missed_ops[1]["seq"], client_id=cid())
        await a.call("react", room_id=rid, seq=missed_ops[2]["seq"], emoji="🎉", client_id=cid())
        await a.call("add_member", room_id=rid, user_id="carol", client_id=cid())
        await a.call("remove_member", room_id=rid, user_id="dave", client_id=cid())
        await a.call("update_room", room_id=rid, title="renamed", client_id=cid())
        await a.call("set_role", room_id=rid, user_id="bob", role="admin", client_id=cid())
        await a.call("remove_member", room_id=gone["room_id"], user_id="bob", client_id=cid())
        new = (await a.call("create_group", title="new", members=["bob"], client_id=cid()))["room"]
        current = (await a.call("history", room_id=rid, after=last_held))["events"]
        final = current[-1]["seq"]
        assert final == last_held + 14

    async with clients(server, "bob") as (b,):
        summary = {r["room_id"]: r for r in b.welcome["rooms"]}
        assert summary[rid]["last_seq"] == final and summary[rid]["title"] == "renamed" and summary[rid]["role"] == "admin"
        got, have, pages = [], last_held, 0
        removed = added = None
        while True:
            result = await b.call("sync", rooms={rid: have, gone["room_id"]: 3})
            pages += 1
            removed, added = result["removed"], result["added"]
            [entry] = result["rooms"]
            assert len(entry["events"]) <= 5 and entry["too_far_behind"] is False
            got += entry["events"]
            have = entry["events"][-1]["seq"]
            if not entry["has_more"]:
                break
        assert pages == 3  # 14 events, 5 per page
        assert [e["seq"] for e in got] == list(range(last_held + 1, final + 1))  # exactly the gap, in order, once
        assert got == current  # the same events, messages in their current state
        kinds = [e["kind"] for e in got]
        assert kinds == ["message"] * 6 + ["edited", "edited", "deleted", "reaction_added", "member_joined", "member_left", "room_updated", "role_changed"]
        assert got[0]["data"] == {"body": "missed 0 (edited)", "edited": True}
        assert got[1]["data"] == {"deleted": True}
        assert got[2]["data"]["reactions"] == {"🎉": ["alice"]}
        assert got[6]["data"] == {"target_seq": 6, "body": "two (edited)"}  # the edit of a message bob held
        assert removed == [gone["room_id"]]
        assert [r["room_id"] for r in added] == [new["room_id"]]
        again = await b.call("sync", rooms={rid: final, new["room_id"]: 0})
        assert [e["seq"] for e in again["rooms"][0]["events"]] == [1, 2, 3] and again["removed"] == []


async def test_what_commits_while_a_session_opens_is_in_its_welcome_or_delivered(chatd_server, monkeypatch):
    """hello reads the rooms, then attaches the session: changes published in between
    (a message, a new room, a removal) must not fall into that gap (docs §9)."""
    from chatd.store import reads

    async with clients(chatd_server, "alice", "bob") as (a, b):
        kept = await group(a, ["bob"])
        dropped = await group(a, ["bob"])
        await until_seq(b, dropped["room_id"], dropped["last_seq"])
        read_rooms = reads.hellos
        changes = {}

        async def read_then_change(pool, user_ids):
            result = await read_rooms(pool, user_ids)
            if "bob" in user_ids and not changes:  # published after the read, before the attach
                changes["sent"] = await send(a, kept["room_id"], "in the gap")
                changes["new"] = await group(a, ["bob"])
                changes["removed"] = await a.call("remove_member", room_id=dropped["room_id"], user_id="bob", client_id=cid())
            return result

        monkeypatch.setattr(reads, "hellos", read_then_change)
        async with connect(chatd_server, "bob") as b2:
            rooms = {r["room_id"]: r for r in b2.welcome["rooms"]}
            new = changes["new"]["room_id"]
            assert dropped["room_id"] not in rooms
            assert rooms[kept["room_id"]]["last_seq"] == changes["sent"]["seq"]
            assert rooms[new]["last_seq"] == changes["new"]["last_seq"]
            await send(a, kept["room_id"], "after")
            await send(a, new, "after")
            assert (await b2.next_of("event", room_id=kept["room_id"]))["seq"] == changes["sent"]["seq"] + 1
            assert (await b2.next_of("event", room_id=new))["seq"] == changes["new"]["last_seq"] + 1
            await silent(b2, 0.3, "event")


async def test_a_removed_member_receives_nothing_more(chatd_server):
    async with clients(chatd_server, "alice", "bob", "carol") as (a, b, c):
        room = await group(a, ["bob", "carol"])
        rid = room["room_id"]
        await until_seq(b, rid, 4)
        removed = await a.call("remove_member", room_id=rid, user_id="bob", client_id=cid())
        last = await b.next_of("event", room_id=rid)
        assert (last["seq"], last["kind"], last["data"]) == (removed["seq"], "member_left", {"user_id": "bob", "removed": True, "by": "alice"})

        msg = await send(a, rid, "behind bob's back")
        await c.call("typing", room_id=rid, active=True)
        await c.call("mark_read", room_id=rid, seq=msg["seq"])
        await a.call("update_room", room_id=rid, title="secret", client_id=cid())
        await until_seq(c, rid, msg["seq"] + 1)
        await silent(b, 0.5)  # no event, typing or receipt of any kind

        for command, fields in [
            ("history", {}),
            ("send", {"client_msg_id": cid(), "body": "let me in"}),
            ("react", {"seq": msg["seq"], "emoji": "👀", "client_id": cid()}),
            ("typing", {"active": True}),
            ("mark_read", {"seq": msg["seq"]}),
        ]:
            e = await b.error(command, room_id=rid, **fields)
            assert e["code"] == "not_found", (command, e)
        synced = await b.call("sync", rooms={rid: removed["seq"]})
        assert synced["removed"] == [rid] and synced["rooms"] == []
        async with connect(chatd_server, "bob") as b2:
            assert b2.welcome["rooms"] == []
            assert (await b2.call("sync", rooms={}))["added"] == []

        # added back: visible again from the new join only
        back = await a.call("add_member", room_id=rid, user_id="bob", client_id=cid())
        joined = await b.next_of("event", room_id=rid)
        assert joined["seq"] == back["seq"] and joined["data"]["user_id"] == "bob"
        hist = await b.call("history", room_id=rid)
        assert [e["seq"] for e in hist["events"]] == [back["seq"]] and hist["has_more"] is False
        await still_works(a, b, rid)


async def test_no_frame_reaches_a_user_outside_the_rooms(chatd_server):
    await register(chatd_server, "eve")
    async with clients(chatd_server, "eve", "alice", "bob") as (eve, a, b):
        room = await group(a, ["bob"], public=True)
        rid = room["room_id"]
        dm = (await a.call("create_dm", user_id="bob", client_id=cid()))["room"]
        msg = await send(a, rid, "hi")
        await send(b, dm["room_id"], "psst")
        await a.call("edit", room_id=rid, seq=msg["seq"], body="hi!", client_id=cid())
        await b.call("react", room_id=rid, seq=msg["seq"], emoji="👋", client_id=cid())
        await b.call("typing", room_id=rid, active=True)
        await b.call("mark_read", room_id=rid, seq=msg["seq"])
        await a.call("set_presence", status="away")
        await a.call("update_room", room_id=rid, title="new title", client_id=cid())
        await until_seq(b, rid, msg["seq"] + 3)
        await silent(eve, 0.5)  # nothing at all: no event, typing, receipt or presence
        joined = await eve.call("join", room_id=rid, client_id=cid())  # public: joinable by id
        assert (await eve.next_of("event", room_id=rid))["seq"] == joined["seq"]


async def test_a_dm_never_gains_a_third_member(chatd_server, db_conninfo):
    await register(chatd_server, "carol")
    async with clients(chatd_server, "alice", "bob", "carol") as (a, b, c):
        dm = (await a.call("create_dm", user_id="bob", client_id=cid()))["room"]
        rid = dm["room_id"]
        assert (await c.error("join", room_id=rid, client_id=cid()))["code"] == "not_found"
        for w, role in ((a, "member"), (b, "admin")):
            e = await w.error("add_member", room_id=rid, user_id="carol", role=role, client_id=cid())
            assert e["code"] == "forbidden"
        other = (await a.call("create_dm", user_id="carol", client_id=cid()))["room"]
        assert other["room_id"] != rid and other["peer"] == "carol"
        rows = await db_fetch(db_conninfo, "SELECT user_id FROM members WHERE room_id = %s ORDER BY user_id", rid)
        assert rows == [("alice",), ("bob",)]
        assert (await c.error("history", room_id=rid))["code"] == "not_found"


async def test_a_handler_crash_closes_only_that_connection(chatd_server, monkeypatch):
    def crash(service, session, cmd):
        raise RuntimeError("handler bug")

    async with clients(chatd_server, "alice", "alice", "bob") as (a1, a2, b):
        room = await group(a1, ["bob"])
        monkeypatch.setitem(commands.HANDLERS, m.Ping, crash)
        await a1.send("ping")
        assert (await a1.closed())[0] == 1011
        await still_works(a2, b, room["room_id"])  # the same user's other connection
        await still_works(b, a2, room["room_id"])
        monkeypatch.undo()
        async with connect(chatd_server, "alice") as again:
            assert (await again.call("ping"))["now"] > 0


async def test_a_bug_in_a_durable_command_harms_no_one_else(chatd_server, monkeypatch):
    async def broken(self, tx):
        raise RuntimeError("mutation bug")

    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        monkeypatch.setattr(ms.UpdateRoom, "apply", broken)
        pipelined = [
            await b.send("send", room_id=rid, client_msg_id=cid(), body="before"),
            await a.send("update_room", room_id=rid, title="boom", client_id=cid()),
            await b.send("send", room_id=rid, client_msg_id=cid(), body="after"),
        ]
        before, failed, after = [await w.reply(r) for w, r in zip((b, a, b), pipelined)]
        assert failed["type"] == "error" and failed["code"] == "internal"
        assert before["type"] == after["type"] == "result" and after["seq"] == before["seq"] + 1
        await still_works(a, b, rid)
        await still_works(b, a, rid)


async def test_a_send_is_acked_while_every_pooled_read_connection_is_busy(make_server):
    """A storm of reads (hellos, syncs, history) must not hold durable writes back: the
    writer has connections of its own."""
    server = await make_server(database={"pool_size": 1, "acquire_timeout": 0.5})
    async with clients(server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        async with server.service.pool.connection():  # the only pooled connection, held
            with trio.fail_after(3):
                ack = await send(a, room["room_id"], "through")
            assert ack["seq"] == room["last_seq"] + 1
            assert (await b.next_of("event", room_id=room["room_id"], kind="message"))["data"]["body"] == "through"
