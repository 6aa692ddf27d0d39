"""The server side of the WebSocket upgrade: read the HTTP request head within a
deadline, answer 101 (or the fitting 4xx), and hand back the open connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from chatd.errors import Timeout
from chatd.protocol import websocket as ws
from chatd.transport.readiness import ReadHub
from chatd.transport.sockio import RECEIVE_SIZE, raw_recv, raw_send
from chatd.transport.websocket import ConnectionClosed, WebSocketConnection


async def accept_websocket(
    stream: trio.SocketStream,
    *,
    handshake_timeout: float,
    max_message_size: int,
    max_pending_bytes: int,
    close_timeout: float = 5.0,
    path_check: Callable[[str], bool] | None = None,
    subprotocols: Sequence[str] = (),
    slow_reason: Callable[[], str] | None = None,
    max_handshake_size: int = 16384,
    hub: ReadHub | None = None,
) -> WebSocketConnection:
    """Perform the server handshake on ``stream`` and return the open connection.

    ``path_check(path)`` returning False answers 404. ``subprotocols`` lists the ones
    the server speaks, in preference order; the first the client offered is chosen.
    On failure the stream is closed and the error raised: HandshakeError after
    answering it (400/404/405/426/431), Timeout when the request head did not
    arrive within ``handshake_timeout``, ConnectionClosed if the client went away.
    Cancel-safe: a cancelled handshake closes the stream.
    """
    try:
        # A bare deadline scope and non-blocking socket calls: a client's request is
        # usually waiting when its task first runs and the 101 fits the send buffer,
        # so the common handshake passes through the scheduler not at all (trio's
        # receive_some and send_all each take a pass even when they need not wait).
        with trio.CancelScope(deadline=trio.current_time() + handshake_timeout) as deadline:
            handshake = await _read_handshake(stream, max_handshake_size)
            if path_check is not None and not path_check(handshake.path):
                raise ws.HandshakeError(404, "no WebSocket endpoint at this path")
            chosen = next((p for p in subprotocols if p in handshake.subprotocols), None)
            await _send_response(stream, ws.accept_response(handshake, chosen))
        if deadline.cancelled_caught:
            raise trio.TooSlowError
    except ws.HandshakeError as exc:
        try:
            with trio.move_on_after(handshake_timeout):
                await _reject(stream, exc)
        finally:
            await trio.aclose_forcefully(stream)
        raise
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise Timeout("websocket handshake timed out") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectionClosed(ws.CLOSE_ABNORMAL, "lost during the handshake") from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return WebSocketConnection(
        stream,
        handshake,
        max_message_size=max_message_size,
        max_pending_bytes=max_pending_bytes,
        close_timeout=close_timeout,
        subprotocol=chosen,
        slow_reason=slow_reason,
        hub=hub,
    )


async def _read_handshake(stream: trio.SocketStream, max_size: int) -> ws.Handshake:
    sock = stream.socket
    data = b""
    while True:
        try:
            chunk = raw_recv(sock)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            raise trio.BrokenResourceError("client closed during the handshake")
        data += chunk
        handshake = ws.parse_handshake(data, max_size=max_size)
        if handshake is not None:
            return handshake


async def _send_response(stream: trio.SocketStream, response: bytes) -> None:
    try:
        sent = raw_send(stream.socket)(response)
    except BlockingIOError:
        sent = 0
    if sent < len(response):
        await stream.send_all(response[sent:])


async def _reject(stream: trio.SocketStream, exc: ws.HandshakeError) -> None:
    """Answer a refused handshake, then linger (see ``_linger``) until the client hangs up."""
    try:
        await stream.send_all(ws.reject_response(exc.status, exc.reason))
        await stream.send_eof()
        while await stream.receive_some(RECEIVE_SIZE):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client is already gone
