"""Decoding client commands: every command, every kind of bad input (chatd.protocol.codec)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.errors import BadFrame, ChatdError, InvalidField, TooLarge, UnknownCommand
from chatd.errors import UnsupportedVersion
from chatd.protocol import messages as m
from chatd.protocol.codec import CommandDecoder, check_limits, decode_command, encode_command

pack = msgspec.msgpack.encode  # tests/protocol/test_wire_compat.py uses the msgpack package

# One valid frame per command, with every optional field set where it has one.
VALID: dict[str, dict[str, Any]] = {
    "hello": {"version": 1, "token": "eyJ.x.y", "client": "chatd-py/1.0", "device": "laptop"},
    "refresh": {"token": "eyJ.new"},
    "create_dm": {"user_id": "bob@example.com", "client_id": "c-1"},
    "create_group": {"title": "Ops", "members": ["bob", "carol"], "public": True,
                     "client_id": "c-2"},
    "join": {"room_id": 7, "client_id": "c-3"},
    "leave": {"room_id": 7, "client_id": "c-4"},
    "add_member": {"room_id": 7, "user_id": "dave", "role": "admin", "client_id": "c-5"},
    "remove_member": {"room_id": 7, "user_id": "dave", "client_id": "c-6"},
    "set_role": {"room_id": 7, "user_id": "dave", "role": "owner", "client_id": "c-7"},
    "update_room": {"room_id": 7, "title": "Ops 2", "client_id": "c-8"},
    "send": {"room_id": 7, "client_msg_id": "m-1", "body": "hi ☃", "reply_to": 3},
    "edit": {"room_id": 7, "seq": 4, "body": "hello", "client_id": "c-9"},
    "delete": {"room_id": 7, "seq": 4, "client_id": "c-10"},
    "react": {"room_id": 7, "seq": 4, "emoji": "👍", "client_id": "c-11"},
    "unreact": {"room_id": 7, "seq": 4, "emoji": "👍", "client_id": "c-12"},
    "mark_read": {"room_id": 7, "seq": 9},
    "typing": {"room_id": 7, "active": False},
    "set_presence": {"status": "invisible"},
    "subscribe_presence": {"user_ids": ["bob", "carol"]},
    "unsubscribe_presence": {"user_ids": ["bob"]},
    "history": {"room_id": 7, "before": 50, "after": 10, "limit": 20},
    "sync": {"rooms": {7: 12, 8: 0}, "limit": 30},
    "ping": {},
}  # fmt: skip


def frame(kind: str, request_id: Any = 1, **changes: Any) -> dict[str, Any]:
    f = {"type": kind, "id": request_id, **VALID[kind], **changes}
    return {k: v for k, v in f.items() if v is not DROP}


DROP = object()


def decode_error(payload: bytes) -> ChatdError:
    with pytest.raises(ChatdError) as info:
        decode_command(payload)
    return info.value


def test_every_command_has_a_valid_sample() -> None:
    assert set(VALID) == set(m.COMMANDS)


@pytest.mark.parametrize("kind", sorted(VALID))
@pytest.mark.parametrize("request_id", [0, 2**64 - 1, "r", "x" * 64])
def test_every_command_decodes_with_its_fields(kind: str, request_id: Any) -> None:
    cmd = decode_command(pack(frame(kind, request_id)))
    assert type(cmd) is m.COMMANDS[kind]
    assert cmd.id == request_id
    for name, value in VALID[kind].items():
        assert getattr(cmd, name) == value


@pytest.mark.parametrize(
    ("kind", "defaults"),
    [
        ("hello", {"client": None, "device": None}),
        ("create_group", {"members": [], "public": False}),
        ("add_member", {"role": "member"}),
        ("send", {"reply_to": None}),
        ("history", {"before": None, "after": None, "limit": 100}),
        ("sync", {"rooms": {}, "limit": 100}),
    ],
)
def test_optional_fields_get_documented_defaults(kind: str, defaults: dict[str, Any]) -> None:
    cmd = decode_command(pack(frame(kind, **{name: DROP for name in defaults})))
    for name, value in defaults.items():
        assert getattr(cmd, name) == value


def test_nil_means_absent_for_optional_fields() -> None:
    cmd = decode_command(pack(frame("send", reply_to=None)))
    assert cmd.reply_to is None  # type: ignore[attr-defined]


def test_page_limits_are_clamped_to_the_configured_maximum() -> None:
    decoder = CommandDecoder(m.Limits(history_page_max=50, sync_page_max=10))

    def limit(payload: dict[str, Any]) -> int:
        return decoder.decode(pack(payload)).limit  # type: ignore[attr-defined,no-any-return]

    assert limit(frame("history", limit=10_000)) == 50
    assert limit(frame("history", limit=5)) == 5
    assert limit(frame("history", limit=DROP)) == 50
    assert limit(frame("sync", limit=DROP)) == 10
    assert limit(frame("sync", limit=11)) == 10


# (frame, error class, details.field or None, request id the error must carry)
INVALID = [
    (frame("send", room_id="7"), InvalidField, "$.room_id", 1),
    (frame("send", room_id=0), InvalidField, "$.room_id", 1),
    (frame("send", room_id=2**63), InvalidField, "$.room_id", 1),
    (frame("send", body=""), InvalidField, "$.body", 1),
    (frame("send", body=None), InvalidField, "$.body", 1),
    (frame("send", body=DROP), InvalidField, "$.body", 1),
    (frame("send", reply_to=0), InvalidField, "$.reply_to", 1),
    (frame("send", client_msg_id=""), InvalidField, "$.client_msg_id", 1),
    (frame("send", "req-9", unexpected=True), InvalidField, "$.unexpected", "req-9"),
    (frame("send", body="x" * 4001), TooLarge, "$.body", 1),
    (frame("send", body="x" * 70_000), TooLarge, "$.body", 1),
    (frame("send", client_msg_id="c" * 65), TooLarge, "$.client_msg_id", 1),
    (frame("edit", body="x" * 4001), TooLarge, "$.body", 1),
    (frame("edit", seq=-1), InvalidField, "$.seq", 1),
    (frame("react", emoji="👍🏽" * 5), TooLarge, "$.emoji", 1),
    (frame("react", emoji=""), InvalidField, "$.emoji", 1),
    (frame("create_dm", user_id="bob smith"), InvalidField, "$.user_id", 1),
    (frame("create_dm", user_id="bob\n"), InvalidField, "$.user_id", 1),
    (frame("create_dm", user_id="b" * 65), TooLarge, "$.user_id", 1),
    (frame("create_group", title=""), InvalidField, "$.title", 1),
    (frame("create_group", title="t" * 201), TooLarge, "$.title", 1),
    (frame("create_group", members=["ok"] * 1001), TooLarge, "$.members", 1),
    (frame("create_group", members=["ok", 5]), InvalidField, "$.members[1]", 1),
    (frame("create_group", public="yes"), InvalidField, "$.public", 1),
    (frame("set_role", role="king"), InvalidField, "$.role", 1),
    (frame("set_presence", status="offline"), InvalidField, "$.status", 1),
    (frame("typing", active=1), InvalidField, "$.active", 1),
    (frame("subscribe_presence", user_ids=["u"] * 501), TooLarge, "$.user_ids", 1),
    (frame("history", limit=0), InvalidField, "$.limit", 1),
    (frame("history", before=1.5), InvalidField, "$.before", 1),
    (frame("sync", rooms={"7": 1}), InvalidField, "$.rooms", 1),
    (frame("sync", rooms={7: -1}), InvalidField, "$.rooms[...]", 1),
    (frame("sync", rooms=[7]), InvalidField, "$.rooms", 1),
    (frame("send", body="a\x00b"), InvalidField, "$.body", 1),
    (frame("send", client_msg_id="\x00"), InvalidField, "$.client_msg_id", 1),
    (frame("edit", body="\x00"), InvalidField, "$.body", 1),
    (frame("react", emoji="\x00"), InvalidField, "$.emoji", 1),
    (frame("create_group", title="t\x00"), InvalidField, "$.title", 1),
    (frame("hello", device="d\x00"), InvalidField, "$.device", 1),
    (frame("hello", token=""), InvalidField, "$.token", 1),
    (frame("hello", version="1"), InvalidField, "$.version", 1),
    (frame("hello", device="d" * 65), TooLarge, "$.device", 1),
    (frame("ping", request_id=DROP), InvalidField, "$.id", None),
    (frame("ping", request_id=-1), InvalidField, "$.id", None),
    (frame("ping", request_id=1.0), InvalidField, "$.id", None),
    (frame("ping", request_id=True), InvalidField, "$.id", None),
    (frame("ping", request_id=""), InvalidField, "$.id", None),
    (frame("ping", request_id="r" * 65), TooLarge, "$.id", None),
    ({"id": 4}, InvalidField, "$.type", 4),
    ({"type": 3, "id": 4}, InvalidField, "$.type", 4),
    ({"type": "ping", "id": 4, 5: 6}, InvalidField, "$", 4),
]


@pytest.mark.parametrize(("payload", "error", "field", "request_id"), INVALID)
def test_invalid_commands_name_the_field(
    payload: dict[Any, Any], error: type[ChatdError], field: str, request_id: Any
) -> None:
    err = decode_error(pack(payload))
    assert type(err) is error
    assert err.details["field"] == field
    assert err.request_id == request_id  # type: ignore[attr-defined]
    assert field in err.message


def test_too_large_reports_the_configured_limit() -> None:
    decoder = CommandDecoder(m.Limits(max_body_chars=10))
    with pytest.raises(TooLarge) as info:
        decoder.decode(pack(frame("send", "r", body="x" * 11)))
    assert info.value.details == {"field": "$.body", "max": 10, "unit": "chars"}
    assert info.value.request_id == "r"  # type: ignore[attr-defined]
    cmd = decoder.decode(pack(frame("send", body="x" * 10)))
    assert cmd.body == "x" * 10  # type: ignore[attr-defined]
    err = decode_error(pack(frame("send", body="x" * 70_000)))  # past the static ceiling
    assert err.details["max"] == 4000
    short_titles = CommandDecoder(m.Limits(max_title_chars=5))
    with pytest.raises(TooLarge) as info:
        short_titles.decode(pack(frame("update_room", title="x" * 6)))
    assert info.value.details == {"field": "$.title", "max": 5, "unit": "chars"}


def test_emoji_limit_counts_utf8_bytes() -> None:
    cmd = decode_command(pack(frame("react", emoji="👍🏽" * 4)))  # 8 code points, 32 bytes
    assert cmd.emoji == "👍🏽" * 4  # type: ignore[attr-defined]
    err = decode_error(pack(frame("react", emoji="a" * 29 + "👍")))  # 29 chars, 33 bytes
    assert err.details == {"field": "$.emoji", "max": 32, "unit": "bytes"}


def test_invalid_field_says_what_was_expected() -> None:
    err = decode_error(pack(frame("send", room_id="7")))
    assert err.details == {"field": "$.room_id", "expected": "int, got str"}
    assert err.code == "invalid_field"
    err = decode_error(pack(frame("send", body=DROP)))
    assert err.details == {"field": "$.body", "expected": "a value"}


def test_unknown_command_reports_its_type_and_id() -> None:
    err = decode_error(pack({"type": "launch_rockets", "id": "r-1", "count": 3}))
    assert type(err) is UnknownCommand
    assert err.code == "unknown_command"
    assert err.details == {"type": "launch_rockets"}
    assert err.request_id == "r-1"  # type: ignore[attr-defined]


def test_unsupported_version_lists_supported_versions() -> None:
    err = decode_error(pack(frame("hello", "h", version=2)))
    assert type(err) is UnsupportedVersion
    assert err.details == {"requested": 2, "supported": [1]}
    assert err.request_id == "h"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never-used msgpack opcode
        b"\x81",  # truncated map
        b"\x91\x01",  # an array
        pack("ping"),
        pack(7),
        pack(None),
        pack(frame("ping")) + b"\x00",  # trailing bytes: two objects in one frame
        b'{"type": "ping", "id": 1}',  # JSON is not MessagePack
        b"\x91" * 100_000 + b"\x01",  # deep nesting
    ],
)
def test_non_maps_and_garbage_are_bad_frames(payload: bytes) -> None:
    err = decode_error(payload)
    assert type(err) is BadFrame
    assert err.code == "bad_frame"
    assert err.request_id is None  # type: ignore[attr-defined]


def test_deep_nesting_inside_a_map_is_an_error_not_a_crash() -> None:
    payload = b"\x83" + pack("type") + pack("ping") + pack("id") + pack(3)
    payload += pack("junk") + b"\x91" * 100_000 + b"\x01"
    err = decode_error(payload)
    assert err.code in {"bad_frame", "invalid_field"}


def test_check_limits_alone_attaches_the_request_id() -> None:
    cmd = m.Send(id=5, room_id=1, client_msg_id="c", body="x" * 20)
    with pytest.raises(TooLarge) as info:
        check_limits(cmd, m.Limits(max_body_chars=10))
    assert info.value.request_id == 5  # type: ignore[attr-defined]
    assert check_limits(m.Ping(id=1), m.Limits()) == m.Ping(id=1)


def test_encode_command_round_trips() -> None:
    cmd = m.Send(id="a", room_id=3, client_msg_id="c", body="hi")
    assert decode_command(encode_command(cmd)) == cmd
    assert decode_command(encode_command(frame("ping", 9))) == m.Ping(id=9)


def test_client_key_names_the_idempotency_key() -> None:
    assert m.client_key(decode_command(pack(frame("send")))) == "m-1"
    assert m.client_key(decode_command(pack(frame("leave")))) == "c-4"
    assert m.client_key(m.Ping(id=1)) is None
    durable = {cls.__struct_config__.tag for cls in m.DURABLE_COMMANDS}
    assert durable == {
        "create_dm", "create_group", "join", "leave", "add_member", "remove_member",
        "set_role", "update_room", "send", "edit", "delete", "react", "unreact",
    }  # fmt: skip


def test_limits_reject_out_of_range_configuration() -> None:
    with pytest.raises(ValueError):
        m.Limits(max_body_chars=m.MAX_BODY_CHARS_CEILING + 1)
    with pytest.raises(ValueError):
        m.Limits(history_page_max=0)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_chatd_errors(payload: bytes) -> None:
    try:
        decode_command(payload)
    except ChatdError as err:
        assert err.code in {"bad_frame", "invalid_field", "too_large", "unknown_command",
                            "unsupported_version"}  # fmt: skip
        assert hasattr(err, "request_id")


ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
scalars = st.one_of(
    st.none(), st.booleans(), ints,
    st.floats(allow_nan=True), st.text(max_size=80), st.binary(max_size=16),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.one_of(st.text(max_size=12), ints), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({f for v in VALID.values() for f in v} | {"id", "type"}))


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(sorted(VALID) + ["nope", ""]),
    st.dictionaries(field_names, values, max_size=6),
)
def test_random_command_shaped_maps_only_raise_chatd_errors(kind: str, fields: dict) -> None:
    payload = pack({"type": kind, **fields})
    try:
        cmd = decode_command(payload)
    except ChatdError as err:
        assert isinstance(err.details, dict)
        assert hasattr(err, "request_id")
    else:
        assert type(cmd) is m.COMMANDS[kind]
