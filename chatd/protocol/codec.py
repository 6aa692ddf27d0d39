"""Frames <-> typed messages, and msgspec errors -> chatd errors (sans-IO).

Server side: :class:`CommandDecoder` (or :func:`decode_command` with default
limits) turns one binary WebSocket payload into one valid :data:`AnyCommand`;
``encode_result`` / ``encode_error`` / ``encode_event`` build the replies.
Client side: ``encode_command`` and ``decode_server_frame``.

Every error raised while decoding a command is a :class:`chatd.errors.ChatdError`
carrying ``request_id`` (the command's id, or None when it could not be read) so
the caller can always answer with exactly one error frame. The id is only read
leniently on the error path; the happy path is one typed msgspec decode.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import msgspec

from chatd.errors import (
    BadFrame,
    ChatdError,
    InvalidField,
    TooLarge,
    UnknownCommand,
    UnsupportedVersion,
)
from chatd.protocol.messages import (
    COMMANDS,
    MAX_EMOJI_BYTES,
    MAX_ID_CHARS,
    NO_NUL,
    SUPPORTED_VERSIONS,
    AnyCommand,
    Command,
    CreateGroup,
    Edit,
    Event,
    EphemeralEvent,
    Hello,
    History,
    Limits,
    React,
    RequestId,
    Result,
    Send,
    Sync,
    Unreact,
    UpdateRoom,
)

__all__ = [
    "WIRE_ERROR_CODES",
    "CommandDecoder",
    "check_limits",
    "decode_command",
    "decode_server_frame",
    "encode_command",
    "encode_error",
    "encode_event",
    "encode_result",
]

# The stable error codes of protocol v1; anything else goes out as "internal".
WIRE_ERROR_CODES: frozenset[str] = frozenset({
    "bad_frame", "unsupported_version", "unknown_command", "invalid_field", "too_large",
    "unauthorized", "token_expired", "forbidden", "not_found", "conflict",
    "rate_limited", "unavailable", "internal",
})  # fmt: skip

_UINT64_MAX = 2**64 - 1
# Malformed MessagePack, strings that are not UTF-8, absurd nesting.
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

_command_decoder = msgspec.msgpack.Decoder(AnyCommand)
_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def _wire_safe(obj: Any) -> Any:
    # Error details may carry anything (an exception, a path); never fail to report.
    return str(obj)


_error_encoder = msgspec.msgpack.Encoder(enc_hook=_wire_safe)


class ErrorFrame(msgspec.Struct, tag_field="type", tag="error", kw_only=True, gc=False):
    """Always carries every key: ``id`` is nil when the request id was unreadable."""

    id: RequestId | None
    code: str
    message: str
    details: dict[str, Any]


# --- limits ---------------------------------------------------------------------------


def _too_large(field: str, limit: int, unit: str, request_id: Any) -> TooLarge:
    err = TooLarge(f"{field} is longer than {limit} {unit}", field=field, max=limit, unit=unit)
    err.request_id = request_id  # type: ignore[attr-defined]
    return err


def _check_hello(cmd: Any, limits: Limits) -> Any:
    if cmd.version not in SUPPORTED_VERSIONS:
        err = UnsupportedVersion(
            f"protocol version {cmd.version} is not supported",
            requested=cmd.version,
            supported=list(SUPPORTED_VERSIONS),
        )
        err.request_id = cmd.id  # type: ignore[attr-defined]
        raise err
    return cmd


def _check_body(cmd: Any, limits: Limits) -> Any:
    if len(cmd.body) > limits.max_body_chars:
        raise _too_large("$.body", limits.max_body_chars, "chars", cmd.id)
    return cmd


def _check_title(cmd: Any, limits: Limits) -> Any:
    if len(cmd.title) > limits.max_title_chars:
        raise _too_large("$.title", limits.max_title_chars, "chars", cmd.id)
    return cmd


def _check_emoji(cmd: Any, limits: Limits) -> Any:
    # The limit is on UTF-8 bytes (up to 8 code points always fit).
    if len(cmd.emoji) > MAX_EMOJI_BYTES // 4 and len(cmd.emoji.encode()) > MAX_EMOJI_BYTES:
        raise _too_large("$.emoji", MAX_EMOJI_BYTES, "bytes", cmd.id)
    return cmd


def _page(cmd: Any, page_max: int) -> Any:
    # An omitted or larger limit means "as many as the server allows"; has_more
    # tells the client to page on, so clamping never loses anything.
    if cmd.limit is None or cmd.limit > page_max:
        return msgspec.structs.replace(cmd, limit=page_max)
    return cmd


_CHECKS: dict[type, Callable[[Any, Limits], Any]] = {
    Hello: _check_hello,
    Send: _check_body,
    Edit: _check_body,
    CreateGroup: _check_title,
    UpdateRoom: _check_title,
    React: _check_emoji,
    Unreact: _check_emoji,
    History: lambda cmd, limits: _page(cmd, limits.history_page_max),
    Sync: lambda cmd, limits: _page(cmd, limits.sync_page_max),
}


def check_limits(cmd: Command, limits: Limits) -> Command:
    """Apply the checks msgspec constraints cannot express; return the command to handle.

    Enforces configured limits (``max_body_chars``, ``max_title_chars``), the
    UTF-8 byte limit of emoji and the protocol version of hello, and normalises
    ``history.limit`` / ``sync.limit`` to an int no greater than the page
    maximum (omitted -> the maximum).

    Raises TooLarge (details: field, max, unit) or UnsupportedVersion (details:
    requested, supported), with ``request_id`` set. Pure; safe to call anywhere.
    """
    check = _CHECKS.get(type(cmd))
    return cmd if check is None else check(cmd, limits)  # type: ignore[no-any-return]


# --- decoding commands ---------------------------------------------------------------

# msgspec messages look like "Expected `int` >= 1 - at `$.room_id`",
# "Expected `int`, got `str` - at `key` in `$.rooms`" or "Object missing required field `x`".
_AT = re.compile(r" - at (`key` in )?`([^`]*)`\Z")
_FIELD = re.compile(r"\AObject (missing required|contains unknown) field `([^`]*)`\Z")
_MAX_LEN = re.compile(r"\AExpected `(str|array|object)` of length <= (\d+)\Z")
_UNITS = {"str": "chars", "array": "items", "object": "entries"}
_NUL_FREE = f"str matching regex {NO_NUL!r}"


def _lenient_id(value: Any) -> int | str | None:
    if type(value) is int and 0 <= value <= _UINT64_MAX:
        return value
    if type(value) is str and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def _error_from_validation(
    payload: bytes, exc: msgspec.ValidationError, limits: Limits
) -> ChatdError:
    try:
        frame = _any_decoder.decode(payload)
    except _UNDECODABLE:
        frame = None
    if not isinstance(frame, dict):
        err: ChatdError = BadFrame("a frame must be one MessagePack map")
        err.request_id = None  # type: ignore[attr-defined]
        return err
    request_id = _lenient_id(frame.get("id"))
    kind = frame.get("type")
    if type(kind) is str and kind not in COMMANDS:
        err = UnknownCommand(f"unknown command {kind[:64]!r}", type=kind[:64])
    else:
        err = _field_error(str(exc), limits)
    err.request_id = request_id  # type: ignore[attr-defined]
    return err


def _field_error(text: str, limits: Limits) -> ChatdError:
    path, in_key = "$", False
    at = _AT.search(text)
    if at is not None:
        path, in_key = at.group(2), bool(at.group(1))
        text = text[: at.start()]
    named = _FIELD.match(text)
    if named is not None:
        field = f"{path}.{named.group(2)}"
        if named.group(1) == "missing required":
            return InvalidField(f"missing required field {field}", field=field, expected="a value")
        return InvalidField(f"unknown field {field}", field=field, expected="no such field")
    too_long = _MAX_LEN.match(text)
    if too_long is not None and not in_key:
        limit, unit = int(too_long.group(2)), _UNITS[too_long.group(1)]
        # Past the static ceiling: report the configured limit the client must meet.
        limit = {"$.body": limits.max_body_chars, "$.title": limits.max_title_chars}.get(
            path, limit
        )
        return TooLarge(f"{path} is longer than {limit} {unit}", field=path, max=limit, unit=unit)
    expected = text.removeprefix("Expected ").replace("`", "")
    if expected == _NUL_FREE:
        expected = "text without NUL characters"
    if in_key:
        expected += " (map key)"
    return InvalidField(f"invalid field {path}: {expected}", field=path, expected=expected)


class CommandDecoder:
    """Decodes client frames into valid commands under one set of :class:`Limits`.

    Build one per server (limits come from config) and share it: it holds no
    per-connection state.
    """

    __slots__ = ("limits",)

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def decode(self, payload: bytes | bytearray | memoryview) -> Command:
        """Decode one binary frame payload into a command ready for its handler.

        Raises (always with ``.request_id``, None when unreadable):
        BadFrame (not MessagePack, trailing bytes, not a map); UnknownCommand
        (details.type); InvalidField (details.field like "$.body", details.expected);
        TooLarge (details.field, max, unit); UnsupportedVersion (hello only).
        Pure and synchronous: safe to call from any task.
        """
        try:
            cmd = _command_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise _error_from_validation(payload, exc, self.limits) from None
        except _UNDECODABLE:
            err = BadFrame("frame is not valid MessagePack (or has invalid UTF-8)")
            err.request_id = None  # type: ignore[attr-defined]
            raise err from None
        return check_limits(cmd, self.limits)


_default_decoder = CommandDecoder(Limits())


def decode_command(payload: bytes | bytearray | memoryview) -> Command:
    """Decode with the default :class:`Limits` (see :meth:`CommandDecoder.decode`)."""
    return _default_decoder.decode(payload)


# --- encoding server frames -------------------------------------------------------------

_TYPE_KEY = _encoder.encode("type")
_ID_KEY = _encoder.encode("id")
_REPLY_TYPES: dict[str, bytes] = {"result": _encoder.encode("result")}


def _map_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x80 | count,))
    if count < 0x10000:
        return b"\xde" + count.to_bytes(2, "big")
    return b"\xdf" + count.to_bytes(4, "big")


def _prepend_type_and_id(reply_type: str, request_id: Any, encoded: bytes) -> bytes:
    # `encoded` is one map; rewrite its header to add "type" and "id" up front
    # instead of converting the Struct to a dict first.
    head = encoded[0]
    if head & 0xF0 == 0x80:
        count, start = head & 0x0F, 1
    elif head == 0xDE:
        count, start = int.from_bytes(encoded[1:3], "big"), 3
    elif head == 0xDF:
        count, start = int.from_bytes(encoded[1:5], "big"), 5
    else:  # pragma: no cover - a Struct always encodes as a map
        raise TypeError("result must encode as a map")
    type_bytes = _REPLY_TYPES.get(reply_type) or _encoder.encode(reply_type)
    return b"".join((
        _map_header(count + 2), _TYPE_KEY, type_bytes, _ID_KEY, _encoder.encode(request_id),
        memoryview(encoded)[start:],
    ))  # fmt: skip


def encode_result(request_id: int | str, result: dict[str, Any] | Result) -> bytes:
    """Encode the reply to one command: ``{"type": "result"|"welcome", "id", ...fields}``.

    ``result`` is a :class:`Result` Struct (``Welcome`` gives ``type: "welcome"``)
    or a plain dict of fields. Raises ValueError if a dict carries "type" or "id",
    TypeError if a value cannot be encoded.
    """
    if isinstance(result, dict):
        if "type" in result or "id" in result:
            raise ValueError("result fields may not be named 'type' or 'id'")
        return _encoder.encode({"type": "result", "id": request_id, **result})
    return _prepend_type_and_id(result.reply_type, request_id, _encoder.encode(result))


def encode_error(request_id: int | str | None, err: BaseException) -> bytes:
    """Encode ``{"type": "error", "id", "code", "message", "details"}``.

    A code outside :data:`WIRE_ERROR_CODES`, or an exception that is not a
    ChatdError, is sent as "internal" with a generic message (no internals leak).
    Never raises for odd detail values: they are sent as strings.
    """
    if isinstance(err, ChatdError) and err.code in WIRE_ERROR_CODES:
        frame = ErrorFrame(id=request_id, code=err.code, message=err.message, details=err.details)
    else:
        frame = ErrorFrame(id=request_id, code="internal", message="internal error", details={})
    try:
        return _error_encoder.encode(frame)
    except (TypeError, ValueError, OverflowError):  # e.g. an int beyond 64 bits
        frame.details = {str(key): str(value) for key, value in frame.details.items()}
        return _error_encoder.encode(frame)


def encode_event(event: Event | EphemeralEvent) -> bytes:
    """Encode a durable or ephemeral event once; the bytes go to every recipient.

    Raises TypeError if ``event.data`` holds something msgpack cannot carry.
    """
    return _encoder.encode(event)


# --- client side ------------------------------------------------------------------------


def encode_command(cmd: dict[str, Any] | Command) -> bytes:
    """Encode one command (a Command Struct, or a dict with "type" and "id").

    Does not validate: the server does. Raises TypeError for unencodable values.
    """
    return _encoder.encode(cmd)


def decode_server_frame(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Decode one server frame into a plain dict with at least a str ``"type"``.

    Lenient by design: unknown fields and types are kept for the caller to ignore.
    Raises BadFrame if the payload is not one MessagePack map with a str "type".
    """
    try:
        frame = _any_decoder.decode(payload)
    except _UNDECODABLE:
        raise BadFrame("server frame is not valid MessagePack") from None
    if not isinstance(frame, dict) or type(frame.get("type")) is not str:
        raise BadFrame("server frame must be a map with a string 'type'")
    return frame
