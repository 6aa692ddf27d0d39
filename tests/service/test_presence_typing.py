"""Ephemeral signals: typing indicators and presence (docs/protocol.md §4, §5.3, §11)."""

from __future__ import annotations

import time

import trio

from tests.service.conftest import cid, clients, group, register, silent
from tests.wire import connect


async def test_typing_reaches_others_only_and_ends_by_stop_ttl_or_close(make_server):
    server = await make_server(limits={"typing_ttl": 1.0})
    await register(server, "dave")
    async with clients(server, "alice", "alice", "bob") as (a1, a2, b):
        assert a1.welcome["limits"]["typing_ttl_ms"] == 1000
        room = await group(a1, ["bob"])
        rid = room["room_id"]

        assert set(await a1.call("typing", room_id=rid, active=True)) == {"type", "id"}
        assert await b.next_of("typing") == {"type": "typing", "room_id": rid, "user_id": "alice", "active": True}
        await a1.call("typing", room_id=rid, active=False)
        assert (await b.next_of("typing"))["active"] is False
        await silent(a2, 0.1, "typing")  # never the typer's own connections
        await silent(a1, 0.05, "typing")

        # renewals keep it alive; without them it ends server-side after typing_ttl
        await a1.call("typing", room_id=rid, active=True)
        assert (await b.next_of("typing"))["active"] is True
        for _ in range(2):
            await silent(b, 0.5, "typing")  # renewed within the TTL: no stop, no repeat
            await a1.call("typing", room_id=rid, active=True)
        renewed = trio.current_time()
        ended = await b.next_of("typing", timeout=3)
        assert ended == {"type": "typing", "room_id": rid, "user_id": "alice", "active": False}
        assert trio.current_time() - renewed >= 1.0 - 0.1

        # closing the typing connection ends it at once, even with another device online
        async with connect(server, "bob") as b2:
            await b2.call("typing", room_id=rid, active=True)
            assert (await a1.next_of("typing"))["active"] is True
        closed = trio.current_time()
        assert (await a1.next_of("typing", timeout=2))["active"] is False
        assert trio.current_time() - closed < 0.8  # the close, not the TTL
        await silent(b, 0.05, "typing")

        async with connect(server, "dave") as d:  # not a member: the room does not exist for them
            assert (await d.error("typing", room_id=rid, active=True))["code"] == "not_found"
        await silent(b, 0.2, "typing")


async def _presence(wire, timeout=3):
    frame = await wire.next_of("presence", timeout)
    return frame["users"]


async def test_presence_aggregates_a_users_devices_for_dm_peers(make_server):
    server = await make_server(limits={"presence_window": 0.2})
    await register(server, "alice")
    async with clients(server, "bob") as (b,):
        await b.call("create_dm", user_id="alice", client_id=cid())  # DM peers see each other without subscribing
        async with connect(server, "alice", device="phone") as a1:
            assert await _presence(b) == [{"user_id": "alice", "status": "online"}]
            async with connect(server, "alice", device="laptop") as a2:
                await silent(b, 0.4, "presence")  # still online: nothing changed
                await a1.call("set_presence", status="away")
                await silent(b, 0.4, "presence")  # the laptop is online
                await a2.call("set_presence", status="away")
                assert await _presence(b) == [{"user_id": "alice", "status": "away"}]
                before = time.time()
                await a2.call("set_presence", status="invisible")  # hides the user everywhere
                [hidden] = await _presence(b)
                assert hidden["status"] == "offline" and before - 1 <= hidden["last_seen"] <= time.time() + 1
                await a2.call("set_presence", status="online")
                assert await _presence(b) == [{"user_id": "alice", "status": "online"}]
                # several changes inside one window: one frame with the latest state
                for status in ("away", "online", "away"):
                    await a2.send("set_presence", status=status)
                assert await _presence(b) == [{"user_id": "alice", "status": "away"}]
                await silent(b, 0.4, "presence")
                for status in ("online", "away"):  # a flap that ends where it started
                    await a2.send("set_presence", status=status)
                await silent(b, 0.5, "presence")
                await a2.call("set_presence", status="online")
                assert await _presence(b) == [{"user_id": "alice", "status": "online"}]
            assert await _presence(b) == [{"user_id": "alice", "status": "away"}]  # the phone remains, away
            await a1.call("ping")  # everything flushed so far is in a1's backlog now
            about_self = [u for f in a1.backlog if f["type"] == "presence" for u in f["users"] if u["user_id"] == "alice"]
            assert about_self == []  # nobody is told about themself
            assert {"user_id": "bob", "status": "online"} in [u for f in a1.backlog if f["type"] == "presence" for u in f["users"]]
        [gone] = await _presence(b)
        assert gone["status"] == "offline" and abs(gone["last_seen"] - time.time()) < 5


async def test_subscribe_presence_only_for_room_mates(make_server):
    server = await make_server(limits={"presence_window": 0.1})
    async with clients(server, "alice", "carol", "dave") as (a, c, d):
        room = await group(a, ["carol"])  # a group, not a DM: no automatic presence
        await a.call("set_presence", status="away")
        await silent(c, 0.3, "presence")

        subscribed = await c.call("subscribe_presence", user_ids=["alice", "dave", "ghost"])
        assert subscribed["presence"] == [
            {"user_id": "alice", "status": "away"},
            {"user_id": "dave", "status": "offline"},  # online, but shares no room with carol
            {"user_id": "ghost", "status": "offline"},
        ]
        await a.call("set_presence", status="online")
        assert await _presence(c) == [{"user_id": "alice", "status": "online"}]
        await d.call("set_presence", status="away")
        await silent(c, 0.3, "presence")  # no events about a non-room-mate

        assert set(await c.call("unsubscribe_presence", user_ids=["alice", "nobody"])) == {"type", "id"}
        await a.call("set_presence", status="away")
        await silent(c, 0.3, "presence")

        await c.call("subscribe_presence", user_ids=["alice"])
        await a.call("set_presence", status="online")
        assert await _presence(c) == [{"user_id": "alice", "status": "online"}]
        e = await c.error("subscribe_presence", user_ids=[f"u{i}" for i in range(500)])
        assert e["code"] == "too_large" and e["details"]["max"] == 500
    # a DM that was never created links no one: a user who did not exist yet stays private
    async with clients(server, "alice") as (a,):
        assert (await a.error("create_dm", user_id="newcomer", client_id=cid()))["code"] == "not_found"
        async with connect(server, "newcomer") as n:
            await n.call("set_presence", status="away")
            await silent(a, 0.4, "presence")
    # everyone gone: a new subscriber learns when alice was last seen
    async with clients(server, "carol") as (c,):
        [alice] = (await c.call("subscribe_presence", user_ids=["alice"]))["presence"]
        assert alice["status"] == "offline" and abs(alice["last_seen"] - time.time()) < 5
    assert room["room_id"]
