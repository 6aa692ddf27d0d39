"""One WebSocket session of protocol v1: connect, hello -> welcome, pipelined requests.

:func:`open_connection` yields a :class:`Connection` once the server said welcome.
The connection's nursery runs trio-websocket's reader and ours: ours routes each
reply to the request waiting for its id and hands every other frame (events,
ephemeral frames, goaway, errors without an id) to ``on_frame`` synchronously, in
arrival order. A Connection never reconnects; :mod:`chatd.client.client` does.
"""

from __future__ import annotations

import itertools
import ssl
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import structlog
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, wrap_client_stream

from chatd import errors
from chatd.client.errors import ConnectionLost, error_from_frame
from chatd.protocol.codec import decode_server_frame, encode_command
from chatd.protocol.messages import PROTOCOL_VERSION

log = structlog.get_logger("chatd.client")

# Server frames are bounded by page sizes, not by max_frame_bytes (docs/protocol.md §1).
MAX_SERVER_FRAME = 64 * 1024 * 1024
CLOSE_ABNORMAL = 1006
_REPLY_TYPES = frozenset({"result", "error", "welcome"})

FrameHandler = Callable[["Connection", dict[str, Any]], None]


class _Pending:
    __slots__ = ("cmd", "done", "frame")

    def __init__(self, cmd: dict[str, Any]) -> None:
        self.cmd = cmd
        self.done = trio.Event()
        self.frame: dict[str, Any] | None = None


class Connection:
    """A live session: ``welcome`` holds the server's welcome frame.

    ``request`` may be called from many tasks at once (commands are pipelined and
    written in call order). Test hook: ``drop_on_reply(cmd) -> bool``, when set, is
    asked about each reply; True drops the connection instead of delivering it, as
    if the network failed after the server answered.
    """

    def __init__(self, ws: Any, stream: trio.abc.Stream, on_frame: FrameHandler, write_timeout: float) -> None:
        self.welcome: dict[str, Any] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.drop_on_reply: Callable[[dict[str, Any]], bool] | None = None
        self._ws = ws
        self._stream = stream
        self._on_frame = on_frame
        self._write_timeout = write_timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._closed = trio.Event()
        self._local_close: tuple[int, str] | None = None
        self._closing: trio.Event | None = None

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    async def wait_closed(self) -> None:
        """Return once the connection has ended (``close_code`` is then set)."""
        await self._closed.wait()

    async def request(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send one command (``{"type": ..., **fields}``, no id) and return its result fields.

        Raises the chatd error matching the server's error frame, or ConnectionLost
        when the connection ends before the reply. Has no deadline of its own: wrap it
        in ``fail_after``. Safe to cancel (a late reply is dropped); the frame itself is
        written shielded, so cancelling never leaves half a frame on the wire.
        """
        if self._closed.is_set():
            raise self._lost()
        request_id = next(self._ids)
        pending = self._pending[request_id] = _Pending(cmd)
        try:
            await self._write(encode_command({**cmd, "id": request_id}))
            await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
        frame = pending.frame
        if frame is None:
            raise self._lost()
        if frame["type"] == "error":
            raise error_from_frame(frame)
        return {k: v for k, v in frame.items() if k not in ("type", "id")}

    async def _write(self, data: bytes) -> None:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._write_timeout) as scope:
                try:
                    await self._ws.send_message(data)
                except ConnectionClosed:
                    raise self._lost() from None
        if scope.cancelled_caught:  # the peer stopped reading: the stream is unusable
            self.abort(CLOSE_ABNORMAL, "write timed out")
            raise self._lost()

    def abort(self, code: int = CLOSE_ABNORMAL, reason: str = "connection aborted") -> None:
        """Drop the TCP connection now, without a close handshake (as a network failure would).

        ``code``/``reason`` are what this side reports as the close. Never blocks or raises.
        """
        if self._closed.is_set() or self._local_close is not None:
            return
        self._local_close = (code, reason)
        stream = self._stream
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        if sock is not None:
            sock.close()  # wakes the readers with ClosedResourceError; trio-websocket reports 1006

    async def aclose(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """Close with a close handshake (bounded by ``timeout``). Idempotent: a second call
        waits for the first. Safe to cancel."""
        if self._closing is not None:
            with trio.move_on_after(timeout):
                await self._closing.wait()
            return
        self._closing = trio.Event()
        if self._local_close is None and not self._closed.is_set():
            self._local_close = (code, reason)
        try:
            with trio.move_on_after(timeout):
                await self._ws.aclose(code, reason)
        except (HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._closing.set()

    async def _read(self) -> None:
        code, reason = CLOSE_ABNORMAL, "connection lost"
        try:
            while True:
                payload = await self._ws.get_message()
                if isinstance(payload, str):
                    continue  # chatd sends binary frames only
                try:
                    frame = decode_server_frame(payload)
                except errors.BadFrame as exc:
                    log.warning("client.bad_server_frame", error=exc.message)
                    self.abort(CLOSE_ABNORMAL, "server sent a malformed frame")
                    continue
                request_id = frame.get("id")
                pending = self._pending.get(request_id) if type(request_id) is int else None
                if pending is not None and frame["type"] in _REPLY_TYPES:
                    if self.drop_on_reply is not None and self.drop_on_reply(pending.cmd):
                        self.abort(CLOSE_ABNORMAL, "dropped by test hook")
                        continue
                    pending.frame = frame
                    pending.done.set()
                else:
                    self._on_frame(self, frame)
        except ConnectionClosed as exc:
            if exc.reason is not None:
                code, reason = exc.reason.code, exc.reason.reason or ""
        finally:
            self._finish(*(self._local_close or (code, reason)))

    def _finish(self, code: int, reason: str) -> None:
        if self._closed.is_set():
            return
        self.close_code, self.close_reason = code, reason
        self._closed.set()
        for pending in list(self._pending.values()):
            pending.done.set()  # frame None: the request raises ConnectionLost

    def _lost(self) -> ConnectionLost:
        code, reason = self._local_close or (self.close_code or CLOSE_ABNORMAL, self.close_reason)
        return ConnectionLost(code, reason)


def _target(url: str) -> tuple[str, int, str, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise errors.InvalidField(f"not a ws:// or wss:// URL: {url!r}", field="url")
    secure = parts.scheme == "wss"
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or (443 if secure else 80), resource, secure


async def _open_stream(host: str, port: int, secure: bool) -> trio.abc.Stream:
    if secure:
        return await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl.create_default_context(), https_compatible=True
        )
    return await trio.open_tcp_stream(host, port)


def _handshake_failure(exc: BaseException) -> ConnectionLost | None:
    """The ConnectionLost for an error raised while connecting, or None if it is not one."""
    if isinstance(exc, ConnectionRejected):
        # A 4xx other than 408/429 will not change by retrying: report it like 1002.
        permanent = 400 <= exc.status_code < 500 and exc.status_code not in (408, 429)
        return ConnectionLost(1002 if permanent else CLOSE_ABNORMAL, f"upgrade rejected with HTTP {exc.status_code}")
    if isinstance(exc, (OSError, HandshakeError, trio.BrokenResourceError, trio.ClosedResourceError)):
        return ConnectionLost(CLOSE_ABNORMAL, f"cannot connect: {exc}")
    return None


@asynccontextmanager
async def open_connection(
    url: str,
    token: str,
    *,
    on_frame: FrameHandler,
    connect_timeout: float = 10.0,
    client: str | None = None,
    device: str | None = None,
) -> AsyncIterator[Connection]:
    """Connect to ``url``, say hello with ``token`` and yield the welcomed Connection.

    Raises ConnectionLost if the server cannot be reached, refuses the upgrade (a 4xx
    is reported with close code 1002) or closes before welcome, or when
    ``connect_timeout`` passes; the chatd error of the server's error frame when it
    refuses the hello (Unauthorized, TokenExpired, Forbidden, UnsupportedVersion,
    RateLimited, Unavailable...); InvalidField for a malformed URL. On exit the
    connection is closed with 1000 unless it already ended. Safe to cancel.
    """
    host, port, resource, secure = _target(url)
    host_header = host if port in (80, 443) else f"{host}:{port}"
    try:
        with trio.fail_after(connect_timeout):
            stream = await _open_stream(host, port, secure)
    except trio.TooSlowError:
        raise ConnectionLost(CLOSE_ABNORMAL, "connect timed out") from None
    except OSError as exc:
        raise ConnectionLost(CLOSE_ABNORMAL, f"cannot connect: {exc.strerror or exc}") from None
    conn: Connection | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    ws = await wrap_client_stream(
                        nursery, stream, host_header, resource, message_queue_size=64, max_message_size=MAX_SERVER_FRAME
                    )
                    conn = Connection(ws, stream, on_frame, connect_timeout)
                    nursery.start_soon(conn._read)
                    hello = {"type": "hello", "version": PROTOCOL_VERSION, "token": token}
                    hello.update({k: v for k, v in (("client", client), ("device", device)) if v})
                    conn.welcome = {"type": "welcome", **await conn.request(hello)}
            except trio.TooSlowError:
                raise ConnectionLost(CLOSE_ABNORMAL, "no welcome within connect_timeout") from None
            try:
                yield conn
            finally:
                await conn.aclose()  # or wait for a close under way: its handshake needs the reader
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # One failure is what callers expect to see: unwrap it (mapping a failed upgrade),
        # leave groups of Cancelled for trio and genuine multi-failures as they are.
        rest = group.split(trio.Cancelled)[1]
        if rest is None or len(_leaves(rest)) != 1:
            raise
        leaf = _leaves(rest)[0]
        mapped = _handshake_failure(leaf) if conn is None or not conn.welcome else None
        if mapped is not None:
            raise mapped from leaf
        _reraise(leaf)
    finally:
        await trio.aclose_forcefully(stream)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _reraise(exc: BaseException) -> None:
    """Raise ``exc`` without chaining the group it was unwrapped from."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc
