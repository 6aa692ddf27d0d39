"""WebSocket close codes of protocol v1: what each means and what a client does.

docs/protocol.md ("Close codes") is written from :data:`CLOSE_CODES`; keep the
two in step. Close reasons are for humans and logs (at most 123 UTF-8 bytes, a
WebSocket rule); clients decide on the code. The one machine-read reason is
:data:`RESUME_SYNC`, sent with 4008 and 4009.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from chatd.errors import (
    ChatdError,
    ClientError,
    Forbidden,
    RateLimited,
    TokenExpired,
    Unauthorized,
)

# The close reason that tells a client how to resume: reconnect, hello, then sync
# from the last seq it holds per room. Nothing durable was lost.
RESUME_SYNC = "resume: sync"
MAX_REASON_BYTES = 123


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    AUTH_TIMEOUT = 4001
    AUTH_FAILED = 4003
    TOKEN_EXPIRED = 4004
    SLOW_CONSUMER = 4008
    DRAINING = 4009


@dataclass(frozen=True, slots=True)
class CloseInfo:
    code: int
    name: str
    meaning: str
    client_action: str
    reconnect: bool  # reconnect automatically (with backoff)?
    resync: bool  # after reconnecting, sync from the last seq held per room?


def _info(code: CloseCode, meaning: str, action: str, reconnect: bool, resync: bool) -> CloseInfo:
    return CloseInfo(int(code), code.name.lower(), meaning, action, reconnect, resync)


CLOSE_CODES: dict[int, CloseInfo] = {
    info.code: info
    for info in (
        _info(CloseCode.NORMAL, "Normal closure: the client or server ended the session.",
              "Nothing; reconnect only if the user wants to be online.", False, True),
        _info(CloseCode.GOING_AWAY, "The peer is going away (sent by clients leaving a page).",
              "Reconnect when needed, then sync.", True, True),
        _info(CloseCode.PROTOCOL_ERROR,
              "Protocol error: broken WebSocket framing, or the first frame was a "
              "malformed hello or asked for an unsupported protocol version (the error "
              "frame before the close says which).",
              "Fix the client; for a version error reconnect with a version listed in "
              "details.supported. Do not retry in a loop.", False, False),
        _info(CloseCode.UNSUPPORTED_DATA, "A text frame was received: chatd speaks binary "
              "frames carrying MessagePack only.", "Fix the client. Do not retry in a loop.",
              False, False),
        _info(CloseCode.POLICY_VIOLATION,
              "Policy violation: repeated bad frames or rate-limit violations, or too many "
              "connections.",
              "Fix the client; reconnect only after a long backoff.", True, True),
        _info(CloseCode.MESSAGE_TOO_BIG, "A frame exceeded limits.max_frame_bytes (enforced "
              "by the transport before decoding).", "Send smaller frames (split sync "
              "requests, shorter bodies); reconnect and sync.", True, True),
        _info(CloseCode.INTERNAL_ERROR, "The server hit an unexpected error on this session.",
              "Reconnect with exponential backoff and jitter, then sync.", True, True),
        _info(CloseCode.AUTH_TIMEOUT, "No hello arrived within the handshake deadline.",
              "Reconnect and send hello as the first frame at once.", True, True),
        _info(CloseCode.AUTH_FAILED, "Authentication failed: the token was invalid, or the "
              "first command was not hello.", "Obtain new credentials before reconnecting; "
              "never retry the same token.", False, False),
        _info(CloseCode.TOKEN_EXPIRED, "The token expired (during hello, or the session "
              "passed token_expires_at without refresh).", "Get a fresh token, reconnect, "
              "then sync. Send refresh before expiry to avoid this.", True, True),
        _info(CloseCode.SLOW_CONSUMER, "The client did not read fast enough and its outbox "
              "overflowed. Reason: 'resume: sync'.", "Reconnect at once and sync from the "
              "last seq held per room; nothing durable was lost.", True, True),
        _info(CloseCode.DRAINING, "The server is shutting down or restarting (a goaway "
              "frame came first). Reason: 'resume: sync'.", "Wait goaway.reconnect_after_ms "
              "(plus jitter), reconnect (any server), then sync.", True, True),
    )
}  # fmt: skip

_UNKNOWN = CloseInfo(0, "unknown", "A close code this client does not know (or 1006: the "
                     "connection dropped without a close frame).",
                     "Reconnect with exponential backoff and jitter, then sync.", True, True)


def describe(code: int) -> CloseInfo:
    """What a close code means and what the client should do; never raises."""
    return CLOSE_CODES.get(code, _UNKNOWN)


def handshake_close_code(err: ChatdError) -> CloseCode:
    """The close code that follows the error frame when the first frame fails with ``err``.

    token_expired -> 4004; unauthorized / forbidden (including "first command was
    not hello") -> 4003; rate_limited -> 1008; other client errors (a malformed
    hello, unsupported_version) -> 1002; server errors (unavailable, internal) -> 1011.
    """
    if isinstance(err, TokenExpired):
        return CloseCode.TOKEN_EXPIRED
    if isinstance(err, (Unauthorized, Forbidden)):
        return CloseCode.AUTH_FAILED
    if isinstance(err, RateLimited):
        return CloseCode.POLICY_VIOLATION
    if isinstance(err, ClientError):
        return CloseCode.PROTOCOL_ERROR
    return CloseCode.INTERNAL_ERROR
