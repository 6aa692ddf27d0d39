"""The WebSocket listener: accepts TCP connections, upgrades them, hands each to
its own session task, and drains them on shutdown.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import structlog
import trio

from chatd import errors
from chatd.config import WebSocketConfig
from chatd.log import Repeats
from chatd.protocol import codec
from chatd.protocol.closecodes import RESUME_SYNC, CloseCode
from chatd.protocol.websocket import encode_binary
from chatd.service.runtime import Service
from chatd.transport.session import handle_connection
from chatd.transport.upgrade import accept_websocket
from chatd.transport.cork import corked
from chatd.transport.readiness import ReadHub
from chatd.transport.websocket import WebSocketConnection

log = structlog.get_logger("chatd.ws")

# Out of descriptors or memory: the listener waits and tries again (as trio's does).
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# A connection that failed between the handshake and accept(): skip it.
_ACCEPT_SKIP_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPERM, errno.EPROTO})
ACCEPT_RETRY = 0.1
# Connections taken from the backlog per wake-up: trio's accept() yields after every
# connection, which holds a connect storm to one accept per scheduler pass.
ACCEPT_BATCH = 32


def _resume_sync() -> str:
    return RESUME_SYNC


class Listener:
    def __init__(self, cfg: WebSocketConfig, service: Service, port: int) -> None:
        self.cfg = cfg
        self.service = service
        self.port = port
        self.url = f"ws://{cfg.host}:{port}{cfg.path}"
        self.connections: set[WebSocketConnection] = set()
        self.accept_scope = trio.CancelScope()
        self.conn_nursery: trio.Nursery | None = None
        self.hub = ReadHub()  # read readiness of every connection (chatd/transport/readiness.py)
        self.unavailable = Repeats(log, "warning", "ws.unavailable")  # commands refused under load
        self._empty = trio.Event()
        self._empty.set()
        # Made once: a closure per connection would be two more objects per socket.
        self._path_check = lambda path: path.split("?", 1)[0] == cfg.path

    async def accept(self, sock: socket.socket) -> None:
        """Accept connections until cancelled, each into its own task of ``conn_nursery``.

        Like trio.serve_listeners, but up to :data:`ACCEPT_BATCH` connections per
        wake-up (docs/decisions.md, "Accepting in batches"), and the task runs
        ``handle_connection`` itself, without a wrapper coroutine that would stay on
        every connection's stack.
        """
        start = self.conn_nursery.start_soon
        wrap = trio.socket.from_stdlib_socket
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BATCH):
                try:
                    raw, _address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP_ERRNOS:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.error("ws.accept_failed", error=os.strerror(exc.errno), retry_in=ACCEPT_RETRY)
                    await trio.sleep(ACCEPT_RETRY)
                    break
                start(handle_connection, trio.SocketStream(wrap(raw)), self)

    async def upgrade(self, stream: trio.SocketStream) -> WebSocketConnection | None:
        """The WebSocket on an accepted stream, registered; None if the upgrade failed."""
        cfg = self.cfg
        try:
            conn = await accept_websocket(
                stream,
                handshake_timeout=cfg.handshake_timeout,
                max_message_size=cfg.max_frame_bytes,
                max_pending_bytes=cfg.max_pending_bytes,
                close_timeout=cfg.close_timeout,
                path_check=self._path_check,
                slow_reason=_resume_sync,
                hub=self.hub,
            )
        except errors.ChatdError:
            return None  # answered (400/404/426/...) or timed out; the stream is closed
        self.connections.add(conn)
        self._empty = trio.Event() if self._empty.is_set() else self._empty
        return conn

    async def release(self, conn: WebSocketConnection) -> None:
        """The connection's session ended: close it (if not yet) and forget it."""
        try:
            await conn.close(CloseCode.NORMAL)
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._empty.set()

    async def drain(self) -> None:
        """Stop accepting; tell every client to reconnect elsewhere and wait for them to go."""
        self.accept_scope.cancel()
        goaway = encode_binary(codec.encode_event({"type": "goaway", "reason": "server draining", "reconnect_after_ms": 1000}))
        for conn in list(self.connections):
            conn.deliver(goaway)
            self.conn_nursery.start_soon(conn.close, CloseCode.DRAINING, RESUME_SYNC)
        await self._empty.wait()


@contextmanager
def _held_writes(service: Service) -> Iterator[None]:
    """The writer publishes and answers each batch in here: a connection's frames
    (a sender's own event and its ack) leave in one send."""
    with corked() as cork:
        yield
    service.rooms.slow_consumers += cork.refused


async def _listen(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``host`` resolves to (as
    trio.open_tcp_listeners binds them)."""
    addresses = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, type_, proto, _name, address in addresses:
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def serve_websocket(cfg: WebSocketConfig, service: Service, scope: trio.CancelScope | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on cfg.host:cfg.port; reports a :class:`Listener` to task_status.

    Raises errors.StartupError when the address cannot be bound.
    """
    try:
        sockets = await _listen(cfg.host, cfg.port, cfg.backlog)
    except OSError as exc:
        hint = " (port in use)" if exc.errno == errno.EADDRINUSE else ""
        raise errors.StartupError(f"cannot listen on {cfg.host}:{cfg.port}{hint}: {exc.strerror}") from None
    port = sockets[0].getsockname()[1]
    listener = Listener(cfg, service, port)
    service.writer.hold = partial(_held_writes, service)
    try:
        # The hub serves every connection's reads, so it outlives the connections.
        async with trio.open_nursery() as hub_nursery:
            hub_nursery.start_soon(listener.hub.run)
            async with trio.open_nursery() as conn_nursery:
                listener.conn_nursery = conn_nursery
                task_status.started(listener)
                with listener.accept_scope:
                    async with trio.open_nursery() as accepting:
                        for sock in sockets:
                            accepting.start_soon(listener.accept, sock)
                _close(sockets)  # draining: the port is free while connections finish
            hub_nursery.cancel_scope.cancel()
    finally:
        _close(sockets)


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        if sock.fileno() != -1:
            trio.lowlevel.notify_closing(sock)
            sock.close()
