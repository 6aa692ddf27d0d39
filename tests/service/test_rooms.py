"""Rooms and membership: create_dm, create_group, join, leave, add_member,
remove_member, set_role, update_room (docs/protocol.md §4, §5.1, §10)."""

from __future__ import annotations

import time

from tests.service.conftest import cid, clients, group, register, send, silent, until_seq
from tests.wire import connect

ROOM_INFO_KEYS = {"room_id", "kind", "title", "public", "created_by", "created_at", "member_count", "last_seq"}
SUMMARY_KEYS = {"room_id", "kind", "title", "role", "public", "last_seq", "read_seq", "unread", "joined_seq"}


def _kinds(events):
    return [(e["seq"], e["kind"], e["sender"], e["data"]) for e in events]


async def test_create_dm_is_one_room_per_pair_from_either_side(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = (await a.call("create_dm", user_id="bob", client_id=cid()))["room"]
        assert set(room) == ROOM_INFO_KEYS | {"peer"}
        assert room["kind"] == "dm" and room["title"] == "" and room["public"] is False
        assert room["created_by"] == "alice" and room["member_count"] == 2 and room["last_seq"] == 3
        assert room["peer"] == "bob" and abs(room["created_at"] - time.time()) < 60
        rid = room["room_id"]
        expected = [
            (1, "room_created", "alice", {"title": "", "kind": "dm"}),
            (2, "member_joined", "alice", {"user_id": "alice", "role": "member"}),
            (3, "member_joined", "alice", {"user_id": "bob", "role": "member", "by": "alice"}),
        ]
        assert _kinds(await a.events(rid, 3)) == expected
        assert _kinds(await b.events(rid, 3)) == expected  # the peer sees it live, from seq 1

        again = (await b.call("create_dm", user_id="alice", client_id=cid()))["room"]
        assert again["room_id"] == rid and again["peer"] == "alice" and again["last_seq"] == 3
        again = (await a.call("create_dm", user_id="bob", client_id=cid()))["room"]
        assert again["room_id"] == rid and again["last_seq"] == 3
        await silent(a, 0.2, "event")
        await silent(b, 0.05, "event")

        e = await a.error("create_dm", user_id="alice", client_id=cid())
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.user_id"
        e = await a.error("create_dm", user_id="ghost", client_id=cid())
        assert e["code"] == "not_found"

        async with connect(chatd_server, "bob") as b2:
            [summary] = b2.welcome["rooms"]
            assert set(summary) == SUMMARY_KEYS | {"peer"}
            assert summary["room_id"] == rid and summary["peer"] == "alice" and summary["kind"] == "dm"
            assert summary["role"] == "member" and summary["joined_seq"] == 1 and summary["last_seq"] == 3


async def test_create_group_result_log_and_errors(chatd_server):
    async with clients(chatd_server, "alice", "bob", "carol") as (a, b, c):
        room = (await a.call("create_group", title="Ops", members=["bob", "alice", "bob", "carol"], client_id=cid()))["room"]
        assert set(room) == ROOM_INFO_KEYS
        assert (room["kind"], room["title"], room["public"], room["created_by"]) == ("group", "Ops", False, "alice")
        assert room["member_count"] == 3 and room["last_seq"] == 4
        rid = room["room_id"]
        expected = [
            (1, "room_created", "alice", {"title": "Ops", "kind": "group"}),
            (2, "member_joined", "alice", {"user_id": "alice", "role": "owner"}),
            (3, "member_joined", "alice", {"user_id": "bob", "role": "member", "by": "alice"}),
            (4, "member_joined", "alice", {"user_id": "carol", "role": "member", "by": "alice"}),
        ]
        for w in (a, b, c):
            assert _kinds(await w.events(rid, 4)) == expected

        public = (await a.call("create_group", title="Lobby", public=True, client_id=cid()))["room"]
        assert public["public"] is True and public["member_count"] == 1 and public["last_seq"] == 2

        e = await a.error("create_group", title="Bad", members=["bob", "ghost"], client_id=cid())
        assert e["code"] == "not_found" and e["details"]["user_id"] == "ghost"
        e = await a.error("create_group", title="", client_id=cid())
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.title"

        async with connect(chatd_server, "bob") as b2:
            [summary] = b2.welcome["rooms"]  # the failed group was not created
            assert set(summary) == SUMMARY_KEYS
            assert (summary["room_id"], summary["role"], summary["title"], summary["joined_seq"]) == (rid, "member", "Ops", 1)
        async with connect(chatd_server, "alice") as a2:
            assert [r["room_id"] for r in a2.welcome["rooms"]] == [rid, public["room_id"]]
            assert [r["role"] for r in a2.welcome["rooms"]] == ["owner", "owner"]


async def test_room_full_is_conflict(make_server):
    server = await make_server(limits={"max_group_members": 2})
    await register(server, "bob", "carol")
    async with clients(server, "alice") as (a,):
        assert a.welcome["limits"]["max_room_members"] == 2
        e = await a.error("create_group", title="Big", members=["bob", "carol"], client_id=cid())
        assert e["code"] == "conflict" and e["details"]["reason"] == "room_full"
        room = await group(a, ["bob"])
        e = await a.error("add_member", room_id=room["room_id"], user_id="carol", client_id=cid())
        assert e["code"] == "conflict" and e["details"]["reason"] == "room_full"


async def test_join_public_only_conflict_when_member_owner_of_an_empty_group(chatd_server):
    await register(chatd_server, "carol")
    async with clients(chatd_server, "alice", "bob") as (a, b):
        lobby = await group(a, title="Lobby", public=True)
        rid = lobby["room_id"]
        await send(a, rid, "before bob")  # seq 3

        joined = await b.call("join", room_id=rid, client_id=cid())
        assert joined["seq"] == 4 and set(joined["room"]) == ROOM_INFO_KEYS
        assert joined["room"]["room_id"] == rid and joined["room"]["member_count"] == 2
        event = await b.next_of("event", room_id=rid)
        assert (event["seq"], event["kind"], event["sender"], event["data"]) == (4, "member_joined", "bob", {"user_id": "bob", "role": "member"})
        assert (await a.next_of("event", room_id=rid, seq=4))["data"] == {"user_id": "bob", "role": "member"}
        hist = await b.call("history", room_id=rid)
        assert [e["seq"] for e in hist["events"]] == [4] and hist["has_more"] is False

        assert (await b.error("join", room_id=rid, client_id=cid()))["code"] == "conflict"
        private = await group(a, ["carol"])
        assert (await b.error("join", room_id=private["room_id"], client_id=cid()))["code"] == "not_found"
        dm = (await a.call("create_dm", user_id="carol", client_id=cid()))["room"]
        assert (await b.error("join", room_id=dm["room_id"], client_id=cid()))["code"] == "not_found"
        assert (await b.error("join", room_id=999999, client_id=cid()))["code"] == "not_found"

        # A public group everybody left: the next one to join becomes its owner.
        empty = await group(a, title="Echo", public=True)
        await a.call("leave", room_id=empty["room_id"], client_id=cid())
        rejoined = await b.call("join", room_id=empty["room_id"], client_id=cid())
        event = await b.next_of("event", room_id=empty["room_id"], seq=rejoined["seq"])
        assert event["data"] == {"user_id": "bob", "role": "owner"}
        await b.call("update_room", room_id=empty["room_id"], title="Mine now", client_id=cid())


async def test_leave_hands_ownership_to_the_oldest_admin_else_the_oldest_member(chatd_server):
    await register(chatd_server, "zed", "amy", "dan")
    async with clients(chatd_server, "alice", "bob", "carol") as (a, b, c):
        room = await group(a, ["bob", "carol"])  # bob then carol, both from seq 1
        rid = room["room_id"]
        await a.call("set_role", room_id=rid, user_id="carol", role="admin", client_id=cid())  # seq 5

        left = await a.call("leave", room_id=rid, client_id=cid())
        assert left == {"type": "result", "id": left["id"], "seq": 6}
        tail = [(e["seq"], e["kind"], e["sender"], e["data"]) for e in (await until_seq(b, rid, 7))[-2:]]
        assert tail == [
            (6, "member_left", "alice", {"user_id": "alice", "removed": False}),
            (7, "role_changed", "alice", {"user_id": "carol", "role": "owner"}),
        ]
        seen = await until_seq(a, rid, 6)
        assert seen[-1]["kind"] == "member_left"
        await send(c, rid, "carol owns this now")
        await silent(a, 0.2, "event")  # a leaver hears nothing more of the room
        assert (await a.error("history", room_id=rid))["code"] == "not_found"

        # Among plain members the oldest join wins, not the alphabet or the table order.
        async with clients(chatd_server, "zed", "amy") as (z, _):
            other = await group(a, ["zed", "amy"])
            orid = other["room_id"]
            await a.call("set_role", room_id=orid, user_id="zed", role="admin", client_id=cid())
            await a.call("set_role", room_id=orid, user_id="zed", role="member", client_id=cid())
            await a.call("set_role", room_id=orid, user_id="amy", role="admin", client_id=cid())
            await a.call("set_role", room_id=orid, user_id="amy", role="member", client_id=cid())
            await a.call("leave", room_id=orid, client_id=cid())
            handover = (await until_seq(z, orid, 10))[-1]
            assert handover["kind"] == "role_changed" and handover["data"] == {"user_id": "zed", "role": "owner"}

        # A DM cannot be left.
        dm = (await b.call("create_dm", user_id="dan", client_id=cid()))["room"]
        assert (await b.error("leave", room_id=dm["room_id"], client_id=cid()))["code"] == "forbidden"


async def test_role_rules_table(chatd_server):
    await register(chatd_server, "dave", "erin", "frank", "gina")
    async with clients(chatd_server, "alice", "bob", "carol") as (a, b, c):
        room = await group(a, ["carol"])
        rid = room["room_id"]
        r = await a.call("add_member", room_id=rid, user_id="bob", role="admin", client_id=cid())
        assert r == {"type": "result", "id": r["id"], "seq": 4}
        ev = await c.next_of("event", room_id=rid, seq=4)
        assert (ev["kind"], ev["sender"], ev["data"]) == ("member_joined", "alice", {"user_id": "bob", "role": "admin", "by": "alice"})

        async def refused(w, code, command, **fields):
            e = await w.error(command, room_id=rid, client_id=cid(), **fields)
            assert e["code"] == code, (command, fields, e)

        # member: none of the moderation commands
        await refused(c, "forbidden", "add_member", user_id="dave")
        await refused(c, "forbidden", "remove_member", user_id="bob")
        await refused(c, "forbidden", "set_role", user_id="carol", role="admin")
        await refused(c, "forbidden", "update_room", title="mine")

        # admin: add plain members, remove plain members, rename; nothing about roles
        r = await b.call("add_member", room_id=rid, user_id="dave", client_id=cid())
        ev = await c.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("member_joined", "bob", {"user_id": "dave", "role": "member", "by": "bob"})
        await refused(b, "forbidden", "add_member", user_id="erin", role="admin")
        await refused(b, "forbidden", "add_member", user_id="erin", role="owner")
        r = await b.call("remove_member", room_id=rid, user_id="dave", client_id=cid())
        ev = await c.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("member_left", "bob", {"user_id": "dave", "removed": True, "by": "bob"})
        await a.call("add_member", room_id=rid, user_id="erin", role="admin", client_id=cid())
        await refused(b, "forbidden", "remove_member", user_id="erin")  # another admin
        await refused(b, "forbidden", "remove_member", user_id="alice")  # the owner
        await refused(b, "forbidden", "set_role", user_id="carol", role="admin")
        await refused(b, "forbidden", "remove_member", user_id="bob")  # oneself: use leave
        r = await b.call("update_room", room_id=rid, title="Renamed", client_id=cid())
        ev = await c.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("room_updated", "bob", {"title": "Renamed"})

        # owner: anything but removing themself; errors by state
        await a.call("add_member", room_id=rid, user_id="frank", role="owner", client_id=cid())
        r = await a.call("remove_member", room_id=rid, user_id="erin", client_id=cid())  # an admin
        await refused(a, "forbidden", "remove_member", user_id="alice")
        await refused(a, "not_found", "remove_member", user_id="dave")  # no longer a member
        await refused(a, "conflict", "add_member", user_id="carol")
        await refused(a, "not_found", "add_member", user_id="ghost")
        await refused(a, "not_found", "set_role", user_id="gina", role="admin")
        await refused(a, "conflict", "set_role", user_id="carol", role="member")
        r = await a.call("set_role", room_id=rid, user_id="carol", role="admin", client_id=cid())
        ev = await c.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("role_changed", "alice", {"user_id": "carol", "role": "admin"})

        # the last owner may not step down; with a second owner they may
        await a.call("set_role", room_id=rid, user_id="alice", role="admin", client_id=cid())
        async with connect(chatd_server, "frank") as f:
            e = await f.error("set_role", room_id=rid, user_id="frank", role="member", client_id=cid())
            assert e["code"] == "conflict" and e["details"]["reason"] == "last_owner"
            await refused(a, "forbidden", "set_role", user_id="frank", role="member")  # alice is admin now

        # nothing of this on a DM
        await register(chatd_server, "gina")
        dm = (await a.call("create_dm", user_id="gina", client_id=cid()))["room"]
        for command, fields in [
            ("add_member", {"user_id": "bob"}),
            ("remove_member", {"user_id": "gina"}),
            ("set_role", {"user_id": "gina", "role": "admin"}),
            ("update_room", {"title": "ours"}),
            ("leave", {}),
        ]:
            e = await a.error(command, room_id=dm["room_id"], client_id=cid(), **fields)
            assert e["code"] == "forbidden", (command, e)

        # a room one is not in does not exist
        async with connect(chatd_server, "gina") as g:
            for command, fields in [("add_member", {"user_id": "dave"}), ("update_room", {"title": "x"}), ("leave", {})]:
                e = await g.error(command, room_id=rid, client_id=cid(), **fields)
                assert e["code"] == "not_found", (command, e)
