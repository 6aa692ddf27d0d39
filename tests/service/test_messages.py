"""Messages: send, edit, delete, react, unreact (docs/protocol.md §4, §5.1)."""

from __future__ import annotations

import time

from tests.service.conftest import cid, clients, group, register, send, silent


async def _current(wire, room_id, seq):
    """The event ``seq`` as history shows it now (messages in their current state)."""
    page = await wire.call("history", room_id=room_id, after=seq - 1, limit=1)
    [event] = page["events"]
    return event


async def test_send_result_live_event_and_errors(chatd_server):
    await register(chatd_server, "carol")
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        sent = await a.call("send", room_id=rid, client_msg_id=cid(), body="hello")
        assert set(sent) == {"type", "id", "seq", "at", "duplicate"}
        assert sent["seq"] == 4 and sent["duplicate"] is False and abs(sent["at"] - time.time()) < 60
        for w in (a, b):  # the sender's own connection gets the event too
            ev = await w.next_of("event", room_id=rid, seq=4)
            assert (ev["kind"], ev["sender"], ev["at"], ev["data"]) == ("message", "alice", sent["at"], {"body": "hello"})

        reply = await send(b, rid, "hi!", reply_to=4)
        ev = await a.next_of("event", room_id=rid, seq=reply["seq"])
        assert ev["data"] == {"body": "hi!", "reply_to": 4} and ev["sender"] == "bob"

        limit = a.welcome["limits"]["max_body_chars"]
        await send(a, rid, "é" * limit)  # the limit counts code points, not bytes
        e = await a.error("send", room_id=rid, client_msg_id=cid(), body="x" * (limit + 1))
        assert e["code"] == "too_large" and e["details"] == {"field": "$.body", "max": limit, "unit": "chars"}
        e = await a.error("send", room_id=rid, client_msg_id=cid(), body="")
        assert e["code"] == "invalid_field" and e["details"]["field"] == "$.body"

        for bad in (999, 1):  # no such event; not a message
            e = await a.error("send", room_id=rid, client_msg_id=cid(), body="re", reply_to=bad)
            assert e["code"] == "not_found", e
        assert (await a.error("send", room_id=999999, client_msg_id=cid(), body="x"))["code"] == "not_found"

        # reply_to a message from before one's joined_seq: not visible, so not found
        lobby = await group(a, title="Lobby", public=True)
        early = await send(a, lobby["room_id"], "before bob")
        await b.call("join", room_id=lobby["room_id"], client_id=cid())
        e = await b.error("send", room_id=lobby["room_id"], client_msg_id=cid(), body="re", reply_to=early["seq"])
        assert e["code"] == "not_found"

        async with clients(chatd_server, "carol") as (c,):  # not a member: the room does not exist
            assert (await c.error("send", room_id=rid, client_msg_id=cid(), body="x"))["code"] == "not_found"
            await silent(c, 0.1, "event")


async def test_edit_own_messages_and_history_keeps_the_edits(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        msg = await send(a, rid, "draft")

        e = await b.error("edit", room_id=rid, seq=msg["seq"], body="bob was here", client_id=cid())
        assert e["code"] == "forbidden"
        edited = await a.call("edit", room_id=rid, seq=msg["seq"], body="final", client_id=cid())
        assert set(edited) == {"type", "id", "seq", "at"} and edited["seq"] == msg["seq"] + 1
        ev = await b.next_of("event", room_id=rid, seq=edited["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("edited", "alice", {"target_seq": msg["seq"], "body": "final"})
        again = await a.call("edit", room_id=rid, seq=msg["seq"], body="final!", client_id=cid())

        page = await b.call("history", room_id=rid, after=msg["seq"] - 1)
        assert [(e["seq"], e["kind"]) for e in page["events"]] == [(4, "message"), (5, "edited"), (6, "edited")]
        assert page["events"][0]["data"] == {"body": "final!", "edited": True}
        assert [e["data"]["body"] for e in page["events"][1:]] == ["final", "final!"]
        assert page["events"][0]["at"] == msg["at"]  # still the time it was sent

        for bad in (1, 999):  # not a message; no such event
            e = await a.error("edit", room_id=rid, seq=bad, body="x", client_id=cid())
            assert e["code"] == "not_found", e
        await a.call("delete", room_id=rid, seq=msg["seq"], client_id=cid())
        e = await a.error("edit", room_id=rid, seq=msg["seq"], body="undead", client_id=cid())
        assert e["code"] == "conflict"
        assert again["seq"] == 6


async def test_delete_is_soft_and_moderators_may_delete_in_groups(chatd_server):
    await register(chatd_server, "carol")
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob", "carol"])
        rid = room["room_id"]
        msg = await send(b, rid, "oops", reply_to=None)
        await b.call("edit", room_id=rid, seq=msg["seq"], body="oops, secret", client_id=cid())
        await a.call("react", room_id=rid, seq=msg["seq"], emoji="👀", client_id=cid())

        deleted = await b.call("delete", room_id=rid, seq=msg["seq"], client_id=cid())
        assert set(deleted) == {"type", "id", "seq"}
        ev = await a.next_of("event", room_id=rid, seq=deleted["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("deleted", "bob", {"target_seq": msg["seq"]})

        page = await a.call("history", room_id=rid, after=msg["seq"] - 1)
        by_seq = {e["seq"]: e for e in page["events"]}
        assert by_seq[msg["seq"]]["data"] == {"deleted": True}  # no body, no reactions
        assert by_seq[msg["seq"] + 1]["data"] == {"target_seq": msg["seq"]}  # the edit lost its body
        assert by_seq[msg["seq"] + 2]["data"] == {"target_seq": msg["seq"], "emoji": "👀"}
        synced = await a.call("sync", rooms={rid: msg["seq"] - 1})
        assert synced["rooms"][0]["events"] == page["events"]  # same shape live, in history, in sync
        assert "secret" not in repr(synced) and "oops" not in repr(synced)

        e = await b.error("delete", room_id=rid, seq=msg["seq"], client_id=cid())
        assert e["code"] == "conflict"
        e = await a.error("react", room_id=rid, seq=msg["seq"], emoji="👍", client_id=cid())
        assert e["code"] == "conflict"
        assert (await a.error("delete", room_id=rid, seq=1, client_id=cid()))["code"] == "not_found"

        # moderators delete anyone's message in a group; members only their own
        async with clients(chatd_server, "carol") as (c,):
            theirs = await send(a, rid, "owner's words")
            assert (await c.error("delete", room_id=rid, seq=theirs["seq"], client_id=cid()))["code"] == "forbidden"
            carols = await send(c, rid, "spam")
            await a.call("delete", room_id=rid, seq=carols["seq"], client_id=cid())
            await a.call("set_role", room_id=rid, user_id="bob", role="admin", client_id=cid())
            carols = await send(c, rid, "more spam")
            await b.call("delete", room_id=rid, seq=carols["seq"], client_id=cid())
            assert (await _current(c, rid, carols["seq"]))["data"] == {"deleted": True}

        # ... but never the other side of a DM
        dm = (await a.call("create_dm", user_id="bob", client_id=cid()))["room"]
        bobs = await send(b, dm["room_id"], "mine")
        assert (await a.error("delete", room_id=dm["room_id"], seq=bobs["seq"], client_id=cid()))["code"] == "forbidden"


async def test_reactions_add_remove_conflict_and_current_state(chatd_server):
    async with clients(chatd_server, "alice", "bob") as (a, b):
        room = await group(a, ["bob"])
        rid = room["room_id"]
        msg = await send(a, rid, "lunch?")
        r = await b.call("react", room_id=rid, seq=msg["seq"], emoji="👍", client_id=cid())
        assert set(r) == {"type", "id", "seq"}
        ev = await a.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["sender"], ev["data"]) == ("reaction_added", "bob", {"target_seq": msg["seq"], "emoji": "👍"})
        await a.call("react", room_id=rid, seq=msg["seq"], emoji="👍", client_id=cid())
        await a.call("react", room_id=rid, seq=msg["seq"], emoji="🍕", client_id=cid())

        e = await b.error("react", room_id=rid, seq=msg["seq"], emoji="👍", client_id=cid())
        assert e["code"] == "conflict"
        e = await b.error("unreact", room_id=rid, seq=msg["seq"], emoji="🍕", client_id=cid())
        assert e["code"] == "not_found"
        for bad in (1, 999):
            assert (await b.error("react", room_id=rid, seq=bad, emoji="👍", client_id=cid()))["code"] == "not_found"
        e = await b.error("react", room_id=rid, seq=msg["seq"], emoji="👍" * 9, client_id=cid())  # 9 chars, 36 bytes
        assert e["code"] == "too_large" and e["details"] == {"field": "$.emoji", "max": 32, "unit": "bytes"}

        current = await _current(b, rid, msg["seq"])
        assert current["data"] == {"body": "lunch?", "reactions": {"👍": ["bob", "alice"], "🍕": ["alice"]}}

        r = await b.call("unreact", room_id=rid, seq=msg["seq"], emoji="👍", client_id=cid())
        ev = await a.next_of("event", room_id=rid, seq=r["seq"])
        assert (ev["kind"], ev["data"]) == ("reaction_removed", {"target_seq": msg["seq"], "emoji": "👍"})
        assert (await _current(a, rid, msg["seq"]))["data"]["reactions"] == {"👍": ["alice"], "🍕": ["alice"]}


async def test_too_many_distinct_reactions(make_server):
    server = await make_server(limits={"max_reactions_per_message": 2})
    async with clients(server, "alice", "bob") as (a, b):
        assert a.welcome["limits"]["max_reactions_per_message"] == 2
        room = await group(a, ["bob"])
        msg = await send(a, room["room_id"], "vote")
        for w, emoji in ((a, "1️⃣"), (b, "2️⃣")):
            await w.call("react", room_id=room["room_id"], seq=msg["seq"], emoji=emoji, client_id=cid())
        e = await a.error("react", room_id=room["room_id"], seq=msg["seq"], emoji="3️⃣", client_id=cid())
        assert e["code"] == "conflict" and e["details"]["reason"] == "too_many_reactions"
        # an emoji already there is not a new one
        await b.call("react", room_id=room["room_id"], seq=msg["seq"], emoji="1️⃣", client_id=cid())
