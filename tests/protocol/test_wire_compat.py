"""Wire compatibility with the independent ``msgpack`` package (what third-party clients use).

Frames built with msgpack.packb must decode with chatd's codec; frames chatd encodes must
unpack with msgpack.unpackb into exactly the keys and types docs/protocol.md documents.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from chatd import errors
from chatd.protocol import messages as m
from chatd.protocol.codec import (
    decode_command,
    decode_server_frame,
    encode_command,
    encode_error,
    encode_event,
    encode_result,
)

# One frame per command, written as a third-party client would (test_messages.py has its own).
VALID: dict[str, dict[str, Any]] = {
    "hello": {"version": 1, "token": "tok", "client": "js/2", "device": "phone"},
    "refresh": {"token": "tok2"},
    "create_dm": {"user_id": "u:bob", "client_id": "1"},
    "create_group": {"title": "T", "members": ["bob"], "public": False, "client_id": "2"},
    "join": {"room_id": 1, "client_id": "3"},
    "leave": {"room_id": 1, "client_id": "4"},
    "add_member": {"room_id": 1, "user_id": "bob", "client_id": "5"},
    "remove_member": {"room_id": 1, "user_id": "bob", "client_id": "6"},
    "set_role": {"room_id": 1, "user_id": "bob", "role": "admin", "client_id": "7"},
    "update_room": {"room_id": 1, "title": "T2", "client_id": "8"},
    "send": {"room_id": 2**62, "client_msg_id": "9", "body": "x" * 4000},
    "edit": {"room_id": 1, "seq": 2**40, "body": "y", "client_id": "10"},
    "delete": {"room_id": 1, "seq": 1, "client_id": "11"},
    "react": {"room_id": 1, "seq": 1, "emoji": "🎉", "client_id": "12"},
    "unreact": {"room_id": 1, "seq": 1, "emoji": "🎉", "client_id": "13"},
    "mark_read": {"room_id": 1, "seq": 0},
    "typing": {"room_id": 1, "active": True},
    "set_presence": {"status": "away"},
    "subscribe_presence": {"user_ids": []},
    "unsubscribe_presence": {"user_ids": ["a", "b"]},
    "history": {"room_id": 1, "before": None, "limit": 1},
    "sync": {"rooms": {}},
    "ping": {},
}


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def shape(frame: dict[str, Any]) -> dict[str, type]:
    return {key: type(value) for key, value in frame.items()}


# --- client -> server ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(VALID))
@pytest.mark.parametrize("use_bin_type", [True, False])  # False: pre-2013 "raw" strings
def test_msgpack_built_commands_decode(kind: str, use_bin_type: bool) -> None:
    payload = msgpack.packb({"type": kind, "id": 42, **VALID[kind]}, use_bin_type=use_bin_type)
    cmd = decode_command(payload)
    assert type(cmd) is m.COMMANDS[kind]
    assert cmd.id == 42
    for name, value in VALID[kind].items():
        assert getattr(cmd, name) == value


def test_every_command_is_covered() -> None:
    assert set(VALID) == set(m.COMMANDS)


@pytest.mark.parametrize("request_id", [0, 127, 128, 255, 65535, 2**32, 2**63, 2**64 - 1, "a-b"])
def test_every_msgpack_integer_width_is_a_request_id(request_id: Any) -> None:
    assert decode_command(msgpack.packb({"type": "ping", "id": request_id})).id == request_id


def test_sync_room_map_uses_integer_keys() -> None:
    cmd = decode_command(msgpack.packb({"type": "sync", "id": 1, "rooms": {1: 0, 2**40: 7}}))
    assert cmd.rooms == {1: 0, 2**40: 7}  # type: ignore[attr-defined]


def test_binary_where_text_is_expected_is_invalid_field() -> None:
    payload = msgpack.packb(
        {"type": "send", "id": 3, "room_id": 1, "client_msg_id": "c", "body": b"hi"},
        use_bin_type=True,
    )
    with pytest.raises(errors.InvalidField) as info:
        decode_command(payload)
    assert info.value.details["field"] == "$.body"
    assert info.value.request_id == 3  # type: ignore[attr-defined]


def test_float_where_integer_is_expected_is_invalid_field() -> None:
    with pytest.raises(errors.InvalidField) as info:
        decode_command(msgpack.packb({"type": "mark_read", "id": 3, "room_id": 1, "seq": 2.0}))
    assert info.value.details["field"] == "$.seq"


def test_encode_command_is_plain_msgpack() -> None:
    cmd = m.Sync(id="s1", rooms={5: 3}, limit=10)
    assert unpack(encode_command(cmd)) == {"type": "sync", "id": "s1", "rooms": {5: 3}, "limit": 10}
    hello = unpack(encode_command(m.Hello(id=1, version=1, token="t")))
    assert hello["type"] == "hello" and hello["version"] == 1 and hello["token"] == "t"


# --- server -> client: results ---------------------------------------------------------

LIMIT_KEYS = {
    "max_frame_bytes", "max_body_chars", "max_title_chars", "history_page_max",
    "sync_page_max", "sync_gap_max", "typing_ttl_ms", "max_reactions_per_message",
    "max_room_members", "max_presence_subscriptions", "commands_per_second", "command_burst",
}  # fmt: skip


def room_summary(**changes: Any) -> m.RoomSummary:
    fields = dict(room_id=7, kind="group", title="Ops", role="owner", public=False,
                  last_seq=12, read_seq=10, unread=2, joined_seq=1)  # fmt: skip
    return m.RoomSummary(**{**fields, **changes})


def room_info(**changes: Any) -> m.RoomInfo:
    fields = dict(room_id=7, kind="group", title="Ops", public=True, created_by="alice",
                  created_at=1700000000.25, member_count=3, last_seq=12)  # fmt: skip
    return m.RoomInfo(**{**fields, **changes})


def message(seq: int, **data: Any) -> m.Event:
    return m.Event(room_id=7, seq=seq, kind="message", sender="alice", at=1700000001.5,
                   data=m.MessageData(**data))  # fmt: skip


def test_welcome_has_exactly_the_documented_keys() -> None:
    welcome = m.Welcome(
        session_id="s-1", server="chatd/0.1.0", protocol=1, user=m.UserInfo(id="alice"),
        limits=m.Limits(), token_expires_at=1700003600.0,
        rooms=[room_summary(), room_summary(room_id=8, kind="dm", title="", role="member",
                                            peer="bob")],
    )  # fmt: skip
    frame = unpack(encode_result("hello-1", welcome))
    assert shape(frame) == {
        "type": str, "id": str, "session_id": str, "server": str, "protocol": int,
        "user": dict, "limits": dict, "rooms": list, "token_expires_at": float,
    }  # fmt: skip
    assert frame["type"] == "welcome" and frame["id"] == "hello-1"
    assert frame["user"] == {"id": "alice"}
    assert set(frame["limits"]) == LIMIT_KEYS
    assert all(type(v) is int for k, v in frame["limits"].items() if k != "commands_per_second")
    assert type(frame["limits"]["commands_per_second"]) is float
    group, dm = frame["rooms"]
    assert shape(group) == {
        "room_id": int, "kind": str, "title": str, "role": str, "public": bool,
        "last_seq": int, "read_seq": int, "unread": int, "joined_seq": int,
    }  # fmt: skip
    assert shape(dm) == {**shape(group), "peer": str}


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (m.SendResult(seq=9, at=1.5, duplicate=False), {"seq": 9, "at": 1.5, "duplicate": False}),
        (m.SendResult(seq=9, at=1.5, duplicate=True), {"seq": 9, "at": 1.5, "duplicate": True}),
        (m.EditResult(seq=10, at=2.0), {"seq": 10, "at": 2.0}),
        (m.SeqResult(seq=11), {"seq": 11}),
        (m.ReadResult(read_seq=11), {"read_seq": 11}),
        (m.RefreshResult(token_expires_at=5.0), {"token_expires_at": 5.0}),
        (m.EmptyResult(), {}),
        (m.PongResult(now=3.25), {"now": 3.25}),
        ({"custom": [1, 2]}, {"custom": [1, 2]}),
        ({}, {}),
        (m.PresenceResult(presence=[m.PresenceInfo(user_id="bob", status="online"),
                                    m.PresenceInfo(user_id="eve", status="offline",
                                                   last_seen=9.5)]),
         {"presence": [{"user_id": "bob", "status": "online"},
                       {"user_id": "eve", "status": "offline", "last_seen": 9.5}]}),
    ],
)  # fmt: skip
@pytest.mark.parametrize("request_id", [0, 2**64 - 1, "r" * 64])
def test_results_are_a_map_with_type_id_and_fields(
    result: Any, expected: dict[str, Any], request_id: Any
) -> None:
    assert unpack(encode_result(request_id, result)) == {
        "type": "result", "id": request_id, **expected,
    }  # fmt: skip


def test_result_with_many_fields_uses_a_wider_map_header() -> None:
    class Wide(m.Result, kw_only=True):
        f0: int = 0
        f1: int = 1
        f2: int = 2
        f3: int = 3
        f4: int = 4
        f5: int = 5
        f6: int = 6
        f7: int = 7
        f8: int = 8
        f9: int = 9
        f10: int = 10
        f11: int = 11
        f12: int = 12
        f13: int = 13

    # 14 explicit fields + type + id = 16 entries: one more than a fixmap holds.
    wide = Wide(**{f"f{i}": i + 100 for i in range(14)})
    assert unpack(encode_result(1, wide)) == {
        "type": "result", "id": 1, **{f"f{i}": i + 100 for i in range(14)},
    }  # fmt: skip


def test_dict_results_may_not_shadow_type_or_id() -> None:
    with pytest.raises(ValueError):
        encode_result(1, {"id": 2})


def test_room_history_and_sync_results() -> None:
    info = room_info(kind="dm", title="", public=False, peer="bob")
    assert unpack(encode_result(1, m.RoomResult(room=info)))["room"] == {
        "room_id": 7, "kind": "dm", "title": "", "public": False, "created_by": "alice",
        "created_at": 1700000000.25, "member_count": 3, "last_seq": 12, "peer": "bob",
    }  # fmt: skip
    joined = unpack(encode_result(1, m.JoinResult(room=room_info(), seq=13)))
    assert set(joined) == {"type", "id", "room", "seq"}

    history = unpack(encode_result(2, m.HistoryResult(events=[message(3, body="x")],
                                                      has_more=True)))  # fmt: skip
    assert history["has_more"] is True and history["events"][0]["seq"] == 3

    snapshot = m.RoomSnapshot(room=room_info(), last_seq=5000, latest=[message(5000, body="z")],
                              members=[m.MemberInfo(user_id="alice", role="owner",
                                                    joined_at=1.0)])  # fmt: skip
    sync = m.SyncResult(
        rooms=[m.SyncRoom(room_id=7, events=[message(13, body="y")], has_more=False,
                          too_far_behind=False),
               m.SyncRoom(room_id=9, events=[], has_more=False, too_far_behind=True,
                          snapshot=snapshot)],
        removed=[4], added=[room_summary(room_id=11)],
    )  # fmt: skip
    frame = unpack(encode_result(3, sync))
    assert set(frame) == {"type", "id", "rooms", "removed", "added"}
    caught_up, behind = frame["rooms"]
    assert set(caught_up) == {"room_id", "events", "has_more", "too_far_behind"}
    assert set(behind) == {"room_id", "events", "has_more", "too_far_behind", "snapshot"}
    assert set(behind["snapshot"]) == {"room", "members", "last_seq", "latest"}
    members = behind["snapshot"]["members"]
    assert members == [{"user_id": "alice", "role": "owner", "joined_at": 1.0}]
    assert frame["removed"] == [4] and frame["added"][0]["room_id"] == 11


# --- server -> client: events ------------------------------------------------------------

EVENT_SHAPE = {"type": str, "room_id": int, "seq": int, "kind": str, "sender": str,
               "at": float, "data": dict}  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "data", "expected"),
    [
        ("message", m.MessageData(body="hi"), {"body": "hi"}),
        ("message", m.MessageData(body="re", reply_to=3), {"body": "re", "reply_to": 3}),
        ("message", m.MessageData(body="v2", edited=True, reactions={"👍": ["bob", "eve"]}),
         {"body": "v2", "edited": True, "reactions": {"👍": ["bob", "eve"]}}),
        ("message", m.MessageData(deleted=True, edited=True), {"deleted": True, "edited": True}),
        ("edited", m.EditedData(target_seq=4, body="v2"), {"target_seq": 4, "body": "v2"}),
        ("deleted", m.DeletedData(target_seq=4), {"target_seq": 4}),
        ("reaction_added", m.ReactionData(target_seq=4, emoji="👍"),
         {"target_seq": 4, "emoji": "👍"}),
        ("reaction_removed", m.ReactionData(target_seq=4, emoji="👍"),
         {"target_seq": 4, "emoji": "👍"}),
        ("member_joined", m.MemberJoinedData(user_id="bob", role="member", by="alice"),
         {"user_id": "bob", "role": "member", "by": "alice"}),
        ("member_joined", m.MemberJoinedData(user_id="bob", role="member"),
         {"user_id": "bob", "role": "member"}),
        ("member_left", m.MemberLeftData(user_id="bob", removed=False),
         {"user_id": "bob", "removed": False}),
        ("member_left", m.MemberLeftData(user_id="bob", removed=True, by="alice"),
         {"user_id": "bob", "removed": True, "by": "alice"}),
        ("role_changed", m.RoleChangedData(user_id="bob", role="admin"),
         {"user_id": "bob", "role": "admin"}),
        ("room_created", m.RoomCreatedData(title="Ops", kind="group"),
         {"title": "Ops", "kind": "group"}),
        ("room_updated", m.RoomUpdatedData(title="Ops 2"), {"title": "Ops 2"}),
        ("message", {"body": "a dict works too"}, {"body": "a dict works too"}),
    ],
)  # fmt: skip
def test_event_frames_have_one_shape(kind: str, data: Any, expected: dict[str, Any]) -> None:
    event = m.Event(room_id=7, seq=12, kind=kind, sender="alice", at=1700000002.0, data=data)
    frame = unpack(encode_event(event))
    assert shape(frame) == EVENT_SHAPE
    assert frame == {"type": "event", "room_id": 7, "seq": 12, "kind": kind,
                     "sender": "alice", "at": 1700000002.0, "data": expected}  # fmt: skip
    if not isinstance(data, dict):
        assert isinstance(data, m.EVENT_DATA[kind])
    assert decode_server_frame(encode_event(event)) == frame


def test_every_event_kind_has_a_data_shape() -> None:
    assert set(m.EVENT_DATA) == m.EVENT_KINDS


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (m.ReceiptEvent(room_id=7, user_id="bob", read_seq=12),
         {"type": "receipt", "room_id": 7, "user_id": "bob", "read_seq": 12}),
        (m.TypingEvent(room_id=7, user_id="bob", active=False),
         {"type": "typing", "room_id": 7, "user_id": "bob", "active": False}),
        (m.PresenceEvent(users=[m.PresenceInfo(user_id="bob", status="away")]),
         {"type": "presence", "users": [{"user_id": "bob", "status": "away"}]}),
        (m.GoAway(reason="draining", reconnect_after_ms=1500),
         {"type": "goaway", "reason": "draining", "reconnect_after_ms": 1500}),
    ],
)  # fmt: skip
def test_ephemeral_events(event: Any, expected: dict[str, Any]) -> None:
    assert unpack(encode_event(event)) == expected


# --- server -> client: errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "code", "details"),
    [
        (errors.InvalidField("bad", field="$.body", expected="str"), "invalid_field",
         {"field": "$.body", "expected": "str"}),
        (errors.RateLimited("slow down", retry_after=2.5), "rate_limited", {"retry_after": 2.5}),
        (errors.Unavailable("db down"), "unavailable", {"retry_after": 1.0}),
        (errors.Timeout(), "unavailable", {"retry_after": 1.0}),
        (errors.TokenExpired("expired"), "token_expired", {}),
        (errors.NotFound("no such room"), "not_found", {}),
    ],
)  # fmt: skip
def test_error_frames_have_exactly_the_documented_keys(err: Any, code: str, details: Any) -> None:
    frame = unpack(encode_error(17, err))
    assert frame == {"type": "error", "id": 17, "code": code, "message": err.message,
                     "details": details}  # fmt: skip


def test_error_frame_id_is_nil_when_unreadable() -> None:
    frame = unpack(encode_error(None, errors.BadFrame("not msgpack")))
    assert set(frame) == {"type", "id", "code", "message", "details"}
    assert frame["id"] is None and frame["code"] == "bad_frame" and frame["details"] == {}


def test_non_wire_errors_go_out_as_internal_without_leaking() -> None:
    for err in (ValueError("secret dsn=postgres://u:p@h"), errors.ConfigError(["x"])):
        frame = unpack(encode_error(1, err))
        assert frame == {"type": "error", "id": 1, "code": "internal",
                         "message": "internal error", "details": {}}  # fmt: skip


def test_unencodable_error_details_become_strings() -> None:
    frame = unpack(encode_error(1, errors.Conflict("dup", other=object(), seq=3)))
    assert frame["details"]["seq"] == 3 and isinstance(frame["details"]["other"], str)


def test_decode_error_then_encode_error_round_trip() -> None:
    with pytest.raises(errors.ChatdError) as info:
        decode_command(msgpack.packb({"type": "send", "id": "q", "room_id": -1}))
    frame = unpack(encode_error(info.value.request_id, info.value))  # type: ignore[attr-defined]
    assert frame["id"] == "q" and frame["code"] == "invalid_field"
    assert frame["details"]["field"] == "$.room_id"


# --- client side: reading server frames ---------------------------------------------------


def test_decode_server_frame_keeps_unknown_fields_and_types() -> None:
    frame = {"type": "future_thing", "x": {"nested": [1, 2.5, None]}, "id": 1}
    assert decode_server_frame(msgpack.packb(frame)) == frame


@pytest.mark.parametrize(
    "payload", [b"\xc1", msgpack.packb([1]), msgpack.packb({"id": 1}), msgpack.packb({"type": 1})]
)
def test_decode_server_frame_rejects_non_frames(payload: bytes) -> None:
    with pytest.raises(errors.BadFrame):
        decode_server_frame(payload)
