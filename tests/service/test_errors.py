"""Bad input gets a typed error or the documented close code, and harms no one else
(docs/protocol.md §1, §3, §6, §7; DESIGN.md §3.6)."""

from __future__ import annotations

import time
import urllib.request

import msgpack
import pytest
import trio
from structlog.testing import capture_logs
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.conftest import start_server, token
from tests.service.conftest import cid, clients, db_execute, db_fetch, expired_token, group, register, still_works, until_seq
from tests.wire import connect

ERROR_KEYS = {"type", "id", "code", "message", "details"}


async def test_welcome_has_every_documented_field(chatd_server):
    async with connect(chatd_server, "alice", client="tests/1", device="ci") as a:
        w = a.welcome
        assert set(w) >= {"type", "id", "session_id", "server", "protocol", "user", "limits", "rooms", "token_expires_at"}
        assert w["protocol"] == 1 and w["user"] == {"id": "alice"} and w["rooms"] == []
        assert isinstance(w["session_id"], str) and w["server"].startswith("chatd/")
        assert time.time() < w["token_expires_at"] <= time.time() + 601
        assert set(w["limits"]) >= {
            "max_frame_bytes", "max_body_chars", "max_title_chars", "history_page_max", "sync_page_max",
            "sync_gap_max", "typing_ttl_ms", "max_reactions_per_message", "max_room_members",
            "max_presence_subscriptions",
        }
        assert all(type(v) is int and v >= 1 for k, v in w["limits"].items() if k != "commands_per_second")
        assert w["limits"]["commands_per_second"] > 0 and w["limits"]["command_burst"] >= 1
        async with connect(chatd_server, "alice") as again:
            assert again.welcome["session_id"] != w["session_id"]


async def test_handshake_failures_answer_then_close_with_their_code(make_server, db_conninfo):
    server = await make_server(websocket={"hello_timeout": 0.5})
    async with clients(server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])

        async with connect(server) as w:  # no hello at all
            assert await w.closed() == (4001, "no hello in time")

        async with connect(server) as w:  # a token that is not a token
            e = await w.error("hello", version=1, token="not-a-jwt")
            assert e["code"] == "unauthorized" and set(e) == ERROR_KEYS
            assert (await w.closed())[0] == 4003

        async with connect(server) as w:  # signed by someone else
            forged = token("alice").rsplit(".", 1)[0] + ".AAAA"
            assert (await w.error("hello", version=1, token=forged))["code"] == "unauthorized"
            assert (await w.closed())[0] == 4003

        async with connect(server) as w:
            e = await w.error("hello", version=1, token=expired_token("alice"))
            assert e["code"] == "token_expired"
            assert (await w.closed())[0] == 4004

        async with connect(server) as w:  # a valid command, but not hello
            e = await w.error("ping")
            assert e["code"] == "unauthorized" and e["id"] is not None
            assert (await w.closed())[0] == 4003

        async with connect(server) as w:
            e = await w.error("hello", version=2, token=token("alice"))
            assert e["code"] == "unsupported_version"
            assert e["details"] == {"requested": 2, "supported": [1]}
            assert (await w.closed())[0] == 1002

        async with connect(server) as w:  # a hello with a field of the wrong type
            e = await w.error("hello", version="1", token=token("alice"))
            assert e["code"] == "invalid_field" and e["details"]["field"] == "$.version"
            assert (await w.closed())[0] == 1002

        await register(server, "mallory")
        await db_execute(db_conninfo, "UPDATE users SET disabled = true WHERE id = 'mallory'")
        async with connect(server) as w:
            assert (await w.error("hello", version=1, token=token("mallory")))["code"] == "forbidden"
            assert (await w.closed())[0] == 4003

        async with connect(server) as w:  # a malformed hello
            await w.send_raw(b"\xc1")
            e = await w.recv()
            assert e["type"] == "error" and e["code"] == "bad_frame" and e["id"] is None
            assert (await w.closed())[0] == 1002

        async with connect(server) as w:
            await w.send_raw("hello?")
            assert (await w.closed())[0] == 1003

        await still_works(a, b, room["room_id"])


async def test_bad_frames_get_errors_and_the_connection_stays_open(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]

        await a.send_raw(b"\xc1\xff garbage")
        e = await a.recv()
        assert e["type"] == "error" and e["code"] == "bad_frame" and e["id"] is None and set(e) == ERROR_KEYS

        await a.send_raw(msgpack.packb([1, 2, 3]))  # valid MessagePack, not a map
        assert (await a.recv())["code"] == "bad_frame"

        await a.send_raw(msgpack.packb({"type": "ping", "id": 7}) + b"\x00")  # trailing bytes
        assert (await a.recv())["code"] == "bad_frame"

        e = await a.error("fly", to="moon")
        assert e["code"] == "unknown_command" and e["details"]["type"] == "fly"

        e = await a.error("send", room_id="one", client_msg_id=cid(), body="x")
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.room_id"

        e = await a.error("send", room_id=rid, client_msg_id=cid(), body="x", colour="red")
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.colour"

        e = await a.error("send", room_id=rid, body="x")
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.client_msg_id"

        e = await a.error("history", room_id=rid, limit=2.0)
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.limit"

        e = await a.error("update_room", room_id=rid, title="t" * 201, client_id=cid())
        assert e["code"] == "too_large" and e["details"]["field"] == "$.title"

        # request ids: uint64 or a 1–64 character string, echoed; an unreadable one is nil
        for request_id in ("req-ü-1", 2**64 - 1):
            assert (await a.reply(await a.send("ping", id=request_id)))["type"] == "result"
        await a.send_raw(msgpack.packb({"type": "ping", "id": -1}))
        e = await a.recv()
        assert e["type"] == "error" and e["code"] == "invalid_field" and e["id"] is None

        # Still open, still useful, and nobody else noticed.
        assert (await a.call("ping"))["now"] > 0
        await still_works(a, b, rid)
        await still_works(b, a, rid)


async def test_nul_in_stored_text_is_refused_by_field_and_the_batch_beside_it_commits(chatd_server):
    # PostgreSQL text cannot hold NUL: were it let through, the statement would fail
    # for every send batched with it.
    async with clients(chatd_server, "alice", "bob") as (a, b):
        rid = (await group(a, ["bob"]))["room_id"]
        bob_send = await b.send("send", room_id=rid, client_msg_id=cid(), body="fine")
        bad_send = await a.send("send", room_id=rid, client_msg_id=cid(), body="nul\x00byte")
        e = await a.reply(bad_send)
        assert e["type"] == "error" and e["code"] == "invalid_field"
        assert e["details"] == {"field": "$.body", "expected": "text without NUL characters"}
        ok = await b.reply(bob_send)
        assert ok["type"] == "result" and ok["seq"] > 0
        for command, fields, field in (
            ("send", {"room_id": rid, "client_msg_id": "a\x00b", "body": "x"}, "$.client_msg_id"),
            ("update_room", {"room_id": rid, "title": "t\x00", "client_id": cid()}, "$.title"),
            ("react", {"room_id": rid, "seq": ok["seq"], "emoji": "\x00", "client_id": cid()}, "$.emoji"),
        ):
            e = await a.error(command, **fields)
            assert e["code"] == "invalid_field" and e["details"]["field"] == field
        await still_works(a, b, rid)


async def test_text_frame_after_welcome_closes_1003_only_that_connection(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        async with connect(chatd_server, "alice") as a2:
            await a2.send_raw("{'type': 'ping'}")
            assert (await a2.closed())[0] == 1003
        await still_works(a, b, room["room_id"])


async def test_oversize_frame_closes_1009(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        limit = a.welcome["limits"]["max_frame_bytes"]
        async with connect(chatd_server, "bob") as b2:
            await b2.send("send", room_id=room["room_id"], client_msg_id=cid(), body="x" * (limit + 10))
            assert (await b2.closed())[0] == 1009
        await still_works(a, b, room["room_id"])


async def test_repeated_bad_frames_close_1008(make_server):
    server = await make_server(websocket={"max_bad_frames": 3})
    async with clients(server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        async with connect(server, "mallory") as m:
            for _ in range(3):
                await m.send_raw(b"\xc1")
                assert (await m.recv())["code"] == "bad_frame"
            await m.send_raw(b"\xc1")
            assert (await m.closed())[0] == 1008
        async with connect(server, "mallory") as m:  # a good command resets the count
            for _ in range(3):
                await m.send_raw(b"\xc1")
                assert (await m.recv())["code"] == "bad_frame"
            await m.call("ping")
            for _ in range(3):
                await m.send_raw(b"\xc1")
                assert (await m.recv())["code"] == "bad_frame"
            await m.call("ping")
        await still_works(a, b, room["room_id"])


async def test_rate_limit_answers_rate_limited_with_retry_after(make_server):
    server = await make_server(limits={"commands_per_second": 5, "command_burst": 5})
    async with clients(server, "alice", "bob") as (a, b):
        rids = [await a.send("ping") for _ in range(8)]
        replies = [await a.reply(r) for r in rids]
        limited = [r for r in replies if r["type"] == "error"]
        assert 1 <= len(limited) <= 3, replies
        assert all(r["code"] == "rate_limited" and 0 < r["details"]["retry_after"] <= 1 for r in limited)
        await trio.sleep(limited[-1]["details"]["retry_after"])
        assert (await a.call("ping"))["now"] > 0  # allowed again after the advertised wait
        assert (await b.call("ping"))["now"] > 0  # the limit is per connection


async def test_token_expiry_closes_4004_unless_refreshed(nursery, tmp_path, db_conninfo):
    # No clock-skew leeway, so the 1-second token ends 1 second in.
    chatd_server = await start_server(nursery, tmp_path, db_conninfo, auth={"leeway": 0})
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        async with connect(chatd_server, "bob", token=token("bob", ttl=1)) as short, \
                connect(chatd_server, "bob", token=token("bob", ttl=1)) as kept:
            assert short.welcome["token_expires_at"] <= time.time() + 2  # exp = ceil(issued + 1)
            refreshed = await kept.call("refresh", token=token("bob", ttl=600))
            assert refreshed["token_expires_at"] > time.time() + 500
            e = await kept.error("refresh", token=token("alice", ttl=600))
            assert e["code"] == "forbidden"
            e = await kept.error("refresh", token="garbage")
            assert e["code"] == "unauthorized"
            e = await kept.error("refresh", token=expired_token("bob"))
            assert e["code"] == "token_expired"
            assert (await short.closed(timeout=4))[0] == 4004
            await trio.sleep(0.3)
            assert (await kept.call("ping"))["now"] > 0  # the refresh moved its deadline
        await still_works(a, b, room["room_id"])


async def test_second_hello_is_conflict_and_ping_reports_server_time(chatd_server):
    async with clients(chatd_server, "alice") as (a,):
        e = await a.error("hello", version=1, token=token("alice"))
        assert e["code"] == "conflict"
        before = time.time()
        now = (await a.call("ping"))["now"]
        assert before - 1 <= now <= time.time() + 1


async def test_slow_consumer_is_closed_4008_and_others_keep_up(make_server):
    server = await make_server(
        websocket={"max_pending_bytes": 4096},
        limits={"commands_per_second": 100000, "command_burst": 100000},
    )
    await register(server, "slow")
    async with clients(server, "alice", "bob") as (a, b):
        room = await group(a, ["bob", "slow"])
        rid = room["room_id"]
        # message_queue_size=0: once one message waits for get_message, the socket is not read.
        async with open_websocket_url(server.ws_url, message_queue_size=0) as slow:
            await slow.send_message(msgpack.packb({"type": "hello", "id": 1, "version": 1, "token": token("slow")}))
            body = "x" * 3000
            last = room["last_seq"]
            with trio.fail_after(30):
                # Flood until the server gave up on the stalled client (its own counter
                # only says when to stop; the client-visible close is asserted below).
                while server.service.rooms.slow_consumers == 0:
                    rids = [await a.send("send", room_id=rid, client_msg_id=cid(), body=body) for _ in range(20)]
                    for r in rids:
                        last = max(last, (await a.reply(r))["seq"])
                    # Alice and Bob keep receiving everything, in order, meanwhile.
                    for w in (a, b):
                        await until_seq(w, rid, last)
            # The stalled client finally reads: some frames, then the close and its hint.
            with trio.fail_after(10):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await slow.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (4008, "resume: sync")
        await still_works(a, b, rid)


async def test_nothing_reaches_a_client_before_its_welcome(make_server):
    """§3: until welcome the server sends nothing else, even while its rooms are busy."""
    server = await make_server(limits={"commands_per_second": 100000, "command_burst": 100000})
    await register(server, "bob")
    async with clients(server, "alice") as (a,):
        room = await group(a, ["bob"])
        stop = trio.Event()

        async def flood():
            while not stop.is_set():
                for _ in range(20):
                    await a.send("send", room_id=room["room_id"], client_msg_id=cid(), body="busy")
                await trio.sleep(0)

        async def discard():
            while True:
                await a.ws.get_message()

        firsts = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            nursery.start_soon(discard)
            with trio.fail_after(20):
                for _ in range(30):
                    async with open_websocket_url(server.ws_url) as ws:
                        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "version": 1, "token": token("bob")}))
                        firsts.append(msgpack.unpackb(await ws.get_message(), strict_map_key=False)["type"])
                        # and the room's events do follow the welcome
                        assert msgpack.unpackb(await ws.get_message(), strict_map_key=False)["type"] == "event"
            stop.set()
            nursery.cancel_scope.cancel()
        assert firsts == ["welcome"] * 30


async def test_a_token_inside_the_clock_skew_leeway_is_not_cut_off(chatd_server):
    from chatd.auth.tokens import mint
    from tests.conftest import SECRET

    # exp was 10 s ago; auth.leeway (30 s) accepts it, so the session must live on.
    stale = mint(SECRET, "carol", ttl=5, now=time.time() - 15)
    async with connect(chatd_server, "carol", token=stale) as c:
        await trio.sleep(0.5)
        assert (await c.call("ping"))["now"] > 0


async def test_a_pipelined_burst_is_rate_limited_not_closed(nursery, tmp_path, db_conninfo):
    server = await start_server(nursery, tmp_path, db_conninfo, limits={"commands_per_second": 20, "command_burst": 20})
    async with connect(server, "alice") as a:
        rids = [await a.send("ping") for _ in range(60)]  # 3 bursts' worth, without waiting
        replies = [await a.reply(rid) for rid in rids]
        limited = [r for r in replies if r["type"] == "error"]
        assert limited and all(r["code"] == "rate_limited" and r["details"]["retry_after"] > 0 for r in limited)
        await trio.sleep(1.2)
        assert (await a.call("ping"))["now"] > 0  # still open: it was told to wait, not cut off


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def _metric(text: str, line_prefix: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_prefix)]
    assert len(values) == 1, text
    return values[0]


async def test_refusals_under_load_lose_nothing_and_log_one_line_a_second(make_server, db_conninfo):
    """A writer queue of one: a pipelined flood of sends is mostly refused ``unavailable``.

    Every refused send commits on retry with its client id, every accepted one committed
    once, /metrics counts each refusal, and the log gets one ``ws.unavailable`` line per
    second with the count it held back, not a line per refusal.
    """
    server = await make_server(writer={"queue_size": 1, "linger": 0}, limits={"command_burst": 1000})
    async with clients(server, "alice", "bob") as (a, b):
        room = (await group(a, ["bob"]))["room_id"]

        async def flood(n: int) -> tuple[list[str], list[str]]:
            ids = [cid("flood") for _ in range(n)]
            rids = [await a.send("send", room_id=room, client_msg_id=c, body=c) for c in ids]
            replies = [await a.reply(r) for r in rids]
            refused = [c for c, r in zip(ids, replies) if r["type"] == "error"]
            assert all(r["code"] == "unavailable" and r["details"]["retry_after"] > 0 for r in replies if r["type"] == "error")
            return [c for c, r in zip(ids, replies) if r["type"] == "result"], refused

        with capture_logs() as logs:
            accepted, refused = await flood(200)
            assert len(refused) >= 10, "the queue of one did not fill: the test shows nothing"
            lines = [e for e in logs if e["event"] == "ws.unavailable"]
            assert len(lines) == 1 and lines[0]["repeated"] == 0 and lines[0]["log_level"] == "warning"
            await trio.sleep(1.1)
            accepted2, refused2 = await flood(200)
            assert refused2
            lines = [e for e in logs if e["event"] == "ws.unavailable"]
            assert len(lines) == 2 and lines[1]["repeated"] == len(refused) - 1  # held back since the first line

        status, _, body = await trio.to_thread.run_sync(_get, server.http_urls[0] + "/metrics")
        assert status == 200
        assert _metric(body.decode(), 'chatd_command_errors_total{code="unavailable"}') == len(refused) + len(refused2)

        for c in refused + refused2:  # the retry the error asks for commits each one
            assert (await a.call("send", room_id=room, client_msg_id=c, body=c))["duplicate"] is False
        for c in accepted[:3]:
            assert (await a.call("send", room_id=room, client_msg_id=c, body=c))["duplicate"] is True
        rows = await db_fetch(db_conninfo, "SELECT body FROM events WHERE room_id = %s AND kind = 'message'", room)
        assert sorted(body for (body,) in rows) == sorted(accepted + refused + accepted2 + refused2)  # each once
        await still_works(a, b, room)
