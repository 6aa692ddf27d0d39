"""The gapless event stream across dropped connections, server restarts, an overflowing
client buffer and a resume from saved positions (docs/protocol.md §9)."""

from __future__ import annotations

import trio

from chatd.client import open_client
from tests.client.helpers import full_log, next_of, seqs, tokens, until_seq, wait_for
from tests.conftest import start_server


async def _busy_room(alice, room: int, rounds: int, pause: float = 0.0) -> int:
    """Messages, edits, deletes, reactions and membership changes; returns the last seq."""
    last = 0
    for i in range(rounds):
        seq = last = (await alice.send(room, f"m{i}"))["seq"]
        if i % 5 == 1:
            last = (await alice.edit(room, seq, f"m{i} (edited)"))["seq"]
        if i % 7 == 2:
            last = (await alice.react(room, seq, "👍"))["seq"]
        if i % 9 == 3:
            last = (await alice.delete(room, seq))["seq"]
        if i == rounds // 4:
            last = (await alice.add_member(room, "carol"))["seq"]
        if i == rounds // 2:
            last = (await alice.set_role(room, "bob", "admin"))["seq"]
            last = (await alice.remove_member(room, "carol"))["seq"]
        if i == 3 * rounds // 4:
            last = (await alice.update_room(room, f"Ops {i}"))["seq"]
        await trio.sleep(pause)
    return last


async def test_receiver_sees_every_event_once_across_dropped_connections(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(30):
        async with open_client(url, tokens("carol"), events=False):
            pass  # carol exists from now on
        bob_client = open_client(url, tokens("bob"), backoff=(0.01, 0.05))
        async with bob_client as bob, open_client(url, tokens("alice")) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            sessions = {bob.welcome["session_id"]}
            received: list[dict] = []

            async def receive() -> None:
                async for item in bob.events():
                    received.append(item)

            async def drop_bob() -> None:
                while True:
                    await trio.sleep(0.06)
                    if bob.connection is not None:
                        sessions.add(bob.welcome["session_id"])
                        bob.connection.abort()  # like a network failure: no close frame

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                nursery.start_soon(drop_bob)
                last = await _busy_room(alice, room, 40, pause=0.005)
                await wait_for(lambda: last in seqs(received, room))
                nursery.cancel_scope.cancel()

            assert len(sessions) >= 3, "bob should have reconnected several times"
            truth = await full_log(alice, room)
            assert [(e["seq"], e["kind"]) for e in received if e["type"] == "event"] == truth
            kinds = {kind for _, kind in truth}
            assert {"edited", "deleted", "reaction_added", "member_left", "role_changed", "room_updated"} <= kinds


async def test_receiver_sees_every_event_once_across_a_server_restart(db_conninfo, tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    with trio.fail_after(40):
        async with trio.open_nursery() as servers:
            first = await start_server(servers, tmp_path / "1", db_conninfo)
            url = [first.ws_url]  # the clients read it at every (re)connect
            async with open_client(first.ws_url, tokens("carol"), events=False):
                pass

            hold_bob = trio.Event()

            async def bob_url() -> str:  # an async provider: keeps bob away while alice writes
                if bob_connected:
                    await hold_bob.wait()
                return url[0]

            bob_connected = False
            async with open_client(bob_url, tokens("bob")) as bob, open_client(lambda: url[0], tokens("alice")) as alice:
                bob_connected = True
                room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
                for i in range(5):
                    await alice.send(room, f"before {i}")
                first_session = bob.welcome["session_id"]
                first.request_stop()  # goaway + 4009 to everyone, then it exits

                async def restart() -> None:
                    await trio.sleep(0.3)
                    second = await start_server(servers, tmp_path / "2", db_conninfo)
                    url[0] = second.ws_url

                servers.start_soon(restart)
                last = await _busy_room(alice, room, 12)  # waits out the restart, then goes on
                assert bob.connection is None  # bob missed all of it
                hold_bob.set()
                items = await until_seq(bob.events(), room, last)

                assert bob.welcome["session_id"] != first_session
                assert any(i["type"] == "goaway" for i in items)
                assert seqs(items, room) == list(range(1, last + 1))
                assert [(e["seq"], e["kind"]) for e in items if e["type"] == "event"] == await full_log(alice, room)
            servers.cancel_scope.cancel()


async def test_overflowing_event_buffer_drops_the_connection_and_resyncs(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(20):
        async with open_client(url, tokens("bob"), event_buffer=8) as bob, open_client(url, tokens("alice"), events=False) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            first = bob.connection
            for i in range(60):  # bob reads nothing meanwhile
                last = (await alice.send(room, f"m{i}"))["seq"]
            await wait_for(lambda: not first.is_open)
            assert first.close_code == 4008  # the client's own slow-consumer drop
            items = await until_seq(bob.events(), room, last)
            assert seqs(items, room) == list(range(1, last + 1))


async def test_resume_from_saved_positions_gets_what_was_missed(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(15):
        async with open_client(url, tokens("bob"), events=False):
            pass
        async with open_client(url, tokens("alice"), events=False) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            other = (await alice.create_group("Later", ["bob"]))["room"]["room_id"]
            gone = (await alice.create_group("Gone", ["bob"]))["room"]["room_id"]
            await alice.remove_member(gone, "bob")  # bob's saved position lists it: "removed"
            for i in range(7):
                await alice.send(room, f"m{i}")
            async with open_client(url, tokens("bob"), state={room: 5, gone: 3}) as bob:
                items = await until_seq(bob.events(), other, 3)
                assert seqs(items, room) == [6, 7, 8, 9, 10]
                assert seqs(items, other) == [1, 2, 3]  # not in the saved state: "added"
                assert {"type": "removed", "room_id": gone} in items
                assert gone not in bob.positions


async def test_room_too_far_behind_yields_a_snapshot_then_live_events(db_conninfo, tmp_path, nursery):
    server = await start_server(nursery, tmp_path, db_conninfo, limits={"retention_events": 10})
    url = server.ws_url
    with trio.fail_after(15):
        async with open_client(url, tokens("bob"), events=False):
            pass
        async with open_client(url, tokens("alice"), events=False) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            for i in range(15):
                last = (await alice.send(room, f"m{i}"))["seq"]  # 17 events bob lacks > 10
            async with open_client(url, tokens("bob"), state={room: 1}) as bob:
                events = bob.events()
                snapshot = await events.receive()
                assert snapshot["type"] == "snapshot" and snapshot["room_id"] == room
                assert snapshot["snapshot"]["last_seq"] == last
                assert snapshot["snapshot"]["latest"][-1]["seq"] == last
                assert bob.positions[room] == last
                after = (await alice.send(room, "live"))["seq"]
                items = await until_seq(events, room, after)
                assert seqs(items, room) == [after]
    server.request_stop()


async def test_presence_subscription_and_status_are_renewed_on_a_new_connection(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(10):
        async with open_client(url, tokens("bob")) as bob, open_client(url, tokens("alice")) as alice:
            await alice.create_group("Ops", ["bob"])  # a shared room, not a DM: presence only by subscription
            watched = await bob.subscribe_presence(["alice"])
            assert watched["presence"] == [{"user_id": "alice", "status": "online"}]
            await bob.set_presence("away")
            first = bob.connection
            first.abort()
            events = bob.events()
            renewed = await next_of(events, "presence")  # the new connection's subscribe result
            assert bob.connection is not first
            assert renewed["users"] == [{"user_id": "alice", "status": "online"}]
            assert (await alice.subscribe_presence(["bob"]))["presence"][0]["status"] == "away"
            await alice.set_presence("away")
            changed = await next_of(events, "presence")
            if changed["users"] == [{"user_id": "alice", "status": "online"}]:
                # alice's connect, flushed after the renewal: a repeat allowed by docs/protocol.md §11
                changed = await next_of(events, "presence")
            assert [(u["user_id"], u["status"]) for u in changed["users"]] == [("alice", "away")]
