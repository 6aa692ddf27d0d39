"""The reconnecting client against a real chatd: commands, errors, pipelining."""

from __future__ import annotations

import pytest
import trio

from chatd import errors
from chatd.client import ClientStopped, open_client
from tests.client.helpers import tokens, until_seq, wait_for
from tests.conftest import start_server


async def test_group_message_round_trip_and_own_events(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(10):
        async with open_client(url, tokens("bob")) as bob, open_client(url, tokens("alice"), device="laptop") as alice:
            assert alice.user_id == "alice" and alice.welcome["protocol"] == 1
            room = (await alice.create_group("Ops", ["bob"]))["room"]
            assert room["member_count"] == 2 and room["last_seq"] == 3
            sent = await alice.send(room["room_id"], "deploy at 5?")
            assert sent["seq"] == 4 and sent["duplicate"] is False
            reply = await bob.send(room["room_id"], "yes", reply_to=4)

            mine = await until_seq(alice.events(), room["room_id"], reply["seq"])
            assert [(e["seq"], e["kind"]) for e in mine] == [
                (1, "room_created"), (2, "member_joined"), (3, "member_joined"), (4, "message"), (5, "message"),
            ]  # fmt: skip
            assert mine[3]["data"] == {"body": "deploy at 5?"} and mine[4]["data"] == {"body": "yes", "reply_to": 4}
            theirs = await until_seq(bob.events(), room["room_id"], 5)
            assert [e["seq"] for e in theirs] == [1, 2, 3, 4, 5]
            assert alice.positions == {room["room_id"]: 5}


async def test_server_errors_arrive_as_typed_chatd_errors(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(10):
        async with open_client(url, tokens("bob")) as bob, open_client(url, tokens("alice")) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            with pytest.raises(errors.NotFound):
                await alice.send(room + 1000, "nobody here")
            with pytest.raises(errors.Forbidden):
                await bob.update_room(room, "mine now")
            with pytest.raises(errors.Conflict):
                await alice.add_member(room, "bob")
            with pytest.raises(errors.NotFound) as unknown_user:
                await alice.create_dm("nobody-ever")
            assert unknown_user.value.code == "not_found"
            with pytest.raises(errors.InvalidField) as invalid:
                await alice.request("send", room_id=room, body="x", client_msg_id="c1", colour="red")
            assert invalid.value.details["field"] == "$.colour"
            with pytest.raises(errors.UnknownCommand):
                await alice.request("teleport")
            assert (await alice.ping())["now"] > 0  # the session is still fine


async def test_pipelined_sends_get_distinct_gapless_seqs(chatd_server):
    with trio.fail_after(20):
        async with open_client(chatd_server.ws_url, tokens("alice")) as alice:
            room = (await alice.create_group("Load"))["room"]["room_id"]  # seqs 1-2
            results: dict[int, dict] = {}

            async def send(i: int) -> None:
                results[i] = await alice.send(room, f"m{i}")

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(send, i)
            assert sorted(r["seq"] for r in results.values()) == list(range(3, 203))
            assert not any(r["duplicate"] for r in results.values())
            # Each ack names the event that carries its body.
            events = await until_seq(alice.events(), room, 202)
            body_at = {e["seq"]: e["data"].get("body") for e in events if e["kind"] == "message"}
            assert all(body_at[r["seq"]] == f"m{i}" for i, r in results.items())


async def test_lost_reply_of_a_send_is_retried_once_as_a_duplicate(chatd_server):
    url = chatd_server.ws_url
    with trio.fail_after(15):
        async with open_client(url, tokens("bob")) as bob, open_client(url, tokens("alice")) as alice:
            room = (await alice.create_group("Ops", ["bob"]))["room"]["room_id"]
            first = alice.connection
            # The server commits the send and answers; the reply is lost with the connection.
            first.drop_on_reply = lambda cmd: cmd["type"] == "send"
            result = await alice.send(room, "only once", client_msg_id="m-1")
            assert result["duplicate"] is True and result["seq"] == 4
            assert alice.connection is not first and not first.is_open

            await bob.send(room, "after")  # seq 5
            seen = await until_seq(bob.events(), room, 5)
            assert [(e["seq"], e["data"].get("body")) for e in seen if e["kind"] == "message"] == [
                (4, "only once"), (5, "after"),
            ]  # fmt: skip
            mine = await until_seq(alice.events(), room, 5)
            assert [e["seq"] for e in mine] == [1, 2, 3, 4, 5]


async def test_request_without_a_connection_times_out(chatd_server):
    url = [chatd_server.ws_url]
    with trio.fail_after(10):
        async with open_client(lambda: url[0], tokens("alice"), request_timeout=0.5, backoff=(0.05, 0.1)) as alice:
            url[0] = "ws://127.0.0.1:1/ws"  # nothing listens there
            alice.connection.abort()
            started = trio.current_time()
            with pytest.raises(errors.Timeout):
                await alice.ping()
            assert 0.4 < trio.current_time() - started < 2
            assert alice.stopped is None  # still trying to reconnect


async def test_bad_token_stops_at_once_without_retrying(chatd_server):
    calls = []

    def bad_token() -> str:
        calls.append(1)
        return "not-a-jwt"

    with trio.fail_after(5):
        with pytest.raises(ClientStopped) as stopped:
            async with open_client(chatd_server.ws_url, bad_token):
                raise AssertionError("must not connect")
    assert stopped.value.close_code == 4003
    assert isinstance(stopped.value.error, errors.Unauthorized)
    assert len(calls) == 1


async def test_bad_token_on_reconnect_stops_the_client_and_ends_events(chatd_server):
    handed_out = []

    def provider() -> str:
        handed_out.append(1)
        return tokens("alice")() if len(handed_out) == 1 else "revoked"

    with trio.fail_after(10):
        async with open_client(chatd_server.ws_url, provider, backoff=(0.01, 0.05)) as alice:
            alice.connection.abort()
            async for _ in alice.events():
                pass  # ends when the client stops
            assert isinstance(alice.stopped, ClientStopped) and alice.stopped.close_code == 4003
            with pytest.raises(ClientStopped):
                await alice.ping()
            await trio.sleep(0.2)
            assert len(handed_out) == 2  # no reconnect loop


async def test_session_outlives_short_tokens_by_refreshing(chatd_server):
    minted = []

    def provider() -> str:
        minted.append(1)
        return tokens("alice", ttl=3)()

    with trio.fail_after(15):
        async with open_client(chatd_server.ws_url, provider) as alice:
            conn = alice.connection
            first_expiry = alice.welcome["token_expires_at"]
            await wait_for(lambda: len(minted) >= 3)  # two refreshes (~2 s and ~4 s in)
            assert alice.connection is conn and conn.is_open  # never closed with 4004
            assert (await alice.ping())["now"] > first_expiry


async def test_burst_past_the_rate_limit_is_paced_not_closed(db_conninfo, tmp_path, nursery):
    limits = {"commands_per_second": 200, "command_burst": 20}
    server = await start_server(nursery, tmp_path, db_conninfo, limits=limits)
    with trio.fail_after(15):
        async with open_client(server.ws_url, tokens("alice"), events=False) as alice:
            room = (await alice.create_group("Burst"))["room"]["room_id"]
            first = alice.connection
            acked = []

            async def send(i: int) -> None:
                acked.append((await alice.send(room, f"m{i}"))["seq"])

            async with trio.open_nursery() as senders:
                for i in range(150):
                    senders.start_soon(send, i)
            # rate_limited replies were waited out and retried; none closed the connection (1008)
            assert sorted(acked) == list(range(3, 153))
            assert alice.connection is first and first.is_open
    server.request_stop()


async def test_first_connect_gives_up_after_connect_timeout():
    with trio.fail_after(5):
        started = trio.current_time()
        with pytest.raises(ClientStopped) as stopped:
            async with open_client("ws://127.0.0.1:1/ws", tokens("alice"), connect_timeout=0.5, backoff=(0.05, 0.1)):
                raise AssertionError("nothing listens there")
        assert stopped.value.close_code == 1006
        assert 0.5 <= trio.current_time() - started < 2
