"""Errors a chatd client sees: server error frames mapped to chatd's own error tree,
plus the two ways a connection can end.

A server ``error`` frame becomes the :mod:`chatd.errors` class of its wire code
(``not_found`` -> NotFound, ``rate_limited`` -> RateLimited with ``retry_after``,
an unknown code -> Internal, as docs/protocol.md §6 asks), so callers catch the same
classes the server raises. A request that outlives its deadline raises
:class:`chatd.errors.Timeout`.
"""

from __future__ import annotations

from typing import Any

from chatd import errors

__all__ = ["ClientStopped", "ConnectionLost", "Disconnected", "error_from_frame"]

_BY_CODE: dict[str, type[errors.ChatdError]] = {
    cls.code: cls
    for cls in (
        errors.BadFrame, errors.UnsupportedVersion, errors.UnknownCommand, errors.InvalidField,
        errors.TooLarge, errors.Unauthorized, errors.TokenExpired, errors.Forbidden,
        errors.NotFound, errors.Conflict, errors.RateLimited, errors.Unavailable, errors.Internal,
    )
}  # fmt: skip


class Disconnected(errors.ChatdError):
    """The WebSocket closed before the reply came.

    ``close_code`` is the server's close code, 1006 when the connection dropped without
    one, or the code the client closed with itself; ``reason`` is the close reason.
    """

    code = "disconnected"

    def __init__(self, close_code: int, reason: str = "", message: str = "") -> None:
        super().__init__(message or f"connection closed with {close_code}" + (f": {reason}" if reason else ""))
        self.close_code = close_code
        self.reason = reason


class ConnectionLost(Disconnected):
    """This connection is gone, the client is not: it reconnects.

    For a durable command the outcome is unknown; retrying with the same client id is
    safe (the reconnecting client does that itself for every command it knows is safe).
    """

    code = "connection_lost"


class ClientStopped(Disconnected):
    """The client has stopped for good and sends nothing more.

    Raised from pending and later calls once the server closed with a code that says
    "do not reconnect" (4003 bad credentials, 1002/1003 protocol errors, 1000), when
    ``reconnect=False`` and the connection ended, or after ``aclose()``. ``error`` is the
    server's error that came with the close (e.g. :class:`chatd.errors.Unauthorized`),
    if there was one.
    """

    code = "client_stopped"

    def __init__(
        self, close_code: int, reason: str = "", *, error: errors.ChatdError | None = None, message: str = ""
    ) -> None:
        if not message:
            message = f"client stopped: connection closed with {close_code}" + (f": {reason}" if reason else "")
            if error is not None:
                message += f" ({error.code}: {error.message})"
        super().__init__(close_code, reason, message)
        self.error = error


def error_from_frame(frame: dict[str, Any]) -> errors.ChatdError:
    """The chatd error for one server ``error`` frame; never raises.

    ``details`` become the error's details (``RateLimited.retry_after`` and
    ``Unavailable.retry_after`` are filled in); ``request_id`` is the frame's ``id``
    and ``wire_code`` the code as sent (it differs from ``.code`` only for codes this
    client does not know, which map to Internal).
    """
    wire_code = frame.get("code")
    cls = _BY_CODE.get(wire_code, errors.Internal) if isinstance(wire_code, str) else errors.Internal
    message = frame.get("message")
    message = message if isinstance(message, str) and message else str(wire_code)
    raw = frame.get("details")
    details = {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}
    if issubclass(cls, (errors.RateLimited, errors.Unavailable)):
        retry_after = details.pop("retry_after", 1.0)
        if not isinstance(retry_after, (int, float)) or isinstance(retry_after, bool) or retry_after < 0:
            retry_after = 1.0
        err: errors.ChatdError = cls(message, retry_after=float(retry_after), **details)
    else:
        err = cls(message, **details)
    err.request_id = frame.get("id")  # type: ignore[attr-defined]
    err.wire_code = wire_code  # type: ignore[attr-defined]
    return err
