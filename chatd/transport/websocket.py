"""WebSocket connections on trio: handshake, reader, and the fan-out write path.

The write path follows DESIGN.md §3.5 and §8. ``deliver(frame)`` never awaits: when
nothing is pending it tries one non-blocking ``send`` and, in the common case that
the kernel takes the whole frame, that is all - no task is woken. Whatever the kernel
refuses goes to a per-connection pending list; the connection's ``run_writer`` task
waits for the socket to drain and writes *everything* pending in one ``send`` per
pass. A connection whose pending bytes exceed ``max_pending_bytes`` is a slow
consumer: unsent whole frames are dropped and the writer closes it with 4008.

A connection's nursery runs the writer next to the task that calls ``receive``
(STYLE.md convention 3): either ``run_writer`` for the connection's whole life, or,
after ``write_on_demand(nursery)``, a writer task started only while something is
pending and ending once it is flushed - an idle connection then costs no task at
all. When the reader ends, cancel the scope and ``close()``.

Reads: given a :class:`~chatd.transport.readiness.ReadHub`, ``receive`` parks until
the hub reports the socket readable (registered once, edge-triggered); without one
it waits through trio's ``wait_readable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import outcome
import trio

from chatd.errors import ChatdError
from chatd.protocol import websocket as ws
from chatd.transport import cork
from chatd.transport.readiness import ReadHub
from chatd.transport.sockio import RECEIVE_SIZE, raw_recv, raw_send

_STARTING = object()  # _writer_task while an on-demand writer is started but not yet running
_OPEN, _CLOSING, _CLOSED = 0, 1, 2
# After our close frame is out: wait for the peer's close frame, or half-close and
# discard input until EOF (the peer broke the protocol), or just hang up.
_AWAIT_CLOSE, _LINGER, _HANG_UP = 0, 1, 2


class ConnectionClosed(ChatdError):
    """The WebSocket is closed: by the peer, by us, or because the connection broke.

    ``close_code`` is the peer's code when the peer started the close, ours when we
    did, 1006 when the TCP connection ended without a close handshake.
    """

    code = "connection_closed"

    def __init__(self, close_code: int, reason: str = "") -> None:
        super().__init__(f"websocket closed with {close_code} {reason}".rstrip())
        self.close_code = close_code
        self.reason = reason


class WebSocketConnection:
    """One accepted WebSocket; created by ``upgrade.accept_websocket``, which it owns the stream of.

    Close the stream only through ``close()``. ``deliver`` may be called from any
    trio task; ``receive`` from one task at a time.
    """

    __slots__ = (
        "path", "subprotocol", "close_code", "close_reason",
        "_stream", "_sock", "_send", "_reader", "_max_pending", "_close_timeout",
        "_slow_reason", "_direct", "_state", "_pending", "_pending_size", "_partial_head",
        "_slow", "_write_failed", "_writer_task", "_writer_nursery", "_parked", "_flushing", "_drained", "_receiving",
        "_peer_closed", "_peer_close_event", "_close_done", "_inbox", "_inbox_pos", "_hub", "_readable", "_read_task",
    )  # fmt: skip

    def __init__(
        self,
        stream: trio.SocketStream,
        handshake: ws.Handshake,
        *,
        max_message_size: int,
        max_pending_bytes: int,
        close_timeout: float,
        subprotocol: str | None = None,
        slow_reason: Callable[[], str] | None = None,
        hub: ReadHub | None = None,
    ) -> None:
        self.path = handshake.path  # not the whole request: its headers would stay with every socket
        self.subprotocol = subprotocol
        self.close_code: int | None = None
        self.close_reason = ""
        self._stream = stream
        self._sock = stream.socket
        self._send = raw_send(stream.socket)
        self._reader = ws.FrameReader(max_message_size=max_message_size)
        if handshake.leftover:
            self._reader.feed(handshake.leftover)
        self._max_pending = max_pending_bytes
        self._close_timeout = close_timeout
        self._slow_reason = slow_reason
        self._direct = True  # == open, nothing pending, not slow, not broken
        self._state = _OPEN
        self._pending: list[bytes | memoryview] = []
        self._pending_size = 0
        self._partial_head = False  # pending[0] is the unsent tail of a started frame
        self._slow = False
        self._write_failed = False
        self._writer_task: trio.lowlevel.Task | None = None  # or _STARTING
        self._writer_nursery: trio.Nursery | None = None
        self._parked: trio.lowlevel.Task | None = None
        self._flushing = False  # close() is waiting to write: the writer stays parked
        self._drained: trio.Event | None = None
        self._receiving = False
        self._peer_closed = False
        self._peer_close_event: trio.Event | None = None
        self._close_done: trio.Event | None = None
        self._inbox: list[tuple[int, bytes]] | None = None
        self._inbox_pos = 0
        # With a hub, receive() parks until the hub reports the socket readable;
        # without one it waits through trio's wait_readable.
        self._readable = False
        self._read_task: trio.lowlevel.Task | None = None
        self._hub = hub
        if hub is not None:
            hub.watch(self._sock.fileno(), self)

    @property
    def pending_bytes(self) -> int:
        """Bytes handed to ``deliver`` that the kernel has not taken yet."""
        return self._pending_size

    @property
    def is_slow(self) -> bool:
        """True once the pending bytes exceeded the bound; the writer closes with 4008."""
        return self._slow

    @property
    def is_open(self) -> bool:
        """True until a close started (ours or the peer's) or the connection broke."""
        return self._state == _OPEN and not self._write_failed

    # --- the write path ---------------------------------------------------------

    def deliver(self, frame: bytes) -> bool:
        """Hand one encoded frame (``ws.encode_binary(...)``) to this connection.

        Never awaits and never raises. Returns False when the frame will not be sent:
        the connection is closing or broken, or it has just become a slow consumer
        (pending bytes over ``max_pending_bytes``), in which case ``run_writer``
        closes it with 4008. The same ``frame`` object may go to many connections.
        Inside a ``cork.corked()`` block the frame is held and True returned; the
        block's end sends it.
        """
        if self._direct:
            if cork.current is not None:
                cork.current.hold(self, frame)
                return True
            try:
                sent = self._send(frame)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._on_write_error()
                return False
            if sent == len(frame):
                return True
            self._direct = False
            rest = memoryview(frame)[sent:] if sent else frame
            self._pending.append(rest)
            self._pending_size = len(rest)
            self._partial_head = sent > 0
            self._wake_writer()
            return self._pending_size <= self._max_pending or self._overflow()
        if self._state != _OPEN or self._slow or self._write_failed:
            return False
        self._pending.append(frame)
        self._pending_size += len(frame)
        return self._pending_size <= self._max_pending or self._overflow()

    def _overflow(self) -> bool:
        # Unsent whole frames can go now (the client resumes from its last seq);
        # a partly sent frame must be finished or the stream would be corrupt.
        self._slow = True
        self._direct = False
        if self._partial_head:
            del self._pending[1:]
            self._pending_size = len(self._pending[0])
        else:
            self._pending.clear()
            self._pending_size = 0
        self._wake_writer()
        return False

    def _on_write_error(self) -> None:
        self._write_failed = True
        self._direct = False
        self._pending.clear()
        self._pending_size = 0
        if self._drained is not None:
            self._drained.set()
        self._wake_writer()

    def _write_pending(self) -> None:
        """One non-blocking ``send`` of everything pending (merged into one buffer)."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        try:
            sent = self._send(data)
        except BlockingIOError:
            return
        except OSError:
            self._on_write_error()
            return
        if sent == len(data):
            pending.clear()
            self._pending_size = 0
            self._partial_head = False
            self._direct = self._state == _OPEN and not self._slow
            if self._drained is not None:
                self._drained.set()
        elif sent:
            pending[:] = [memoryview(data)[sent:]]
            self._pending_size = len(data) - sent
            self._partial_head = True

    # The writer sleeps with the cheapest primitive trio has: it parks itself with
    # wait_task_rescheduled and deliver() reschedules it. A trio.Event would need a
    # new object per wait and a ParkingLot adds a dict; here waking is one attribute
    # swap plus reschedule(). ``_parked`` holds the task only while it is parked, so
    # it is rescheduled at most once per park, and the abort callback makes the
    # park cancellable.
    def _wake_writer(self) -> None:
        task = self._parked
        if task is not None:
            self._parked = None
            trio.lowlevel.reschedule(task)
        elif self._writer_task is None and self._writer_nursery is not None:
            self._writer_task = _STARTING
            try:
                self._writer_nursery.start_soon(self._write_until_flushed)
            except RuntimeError:  # the connection's nursery is closing: close() flushes
                self._writer_task = None
                self._writer_nursery = None

    def _abort_park(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._parked = None
        return trio.lowlevel.Abort.SUCCEEDED

    def write_on_demand(self, nursery: trio.Nursery) -> None:
        """Start a writer task in ``nursery`` whenever something is pending (instead of
        ``run_writer``); it flushes, closes a slow consumer with 4008, and ends."""
        self._writer_nursery = nursery
        if self._pending or self._slow or self._write_failed:
            self._wake_writer()

    async def run_writer(self) -> None:
        """Flush pending frames until the connection closes; run one per connection.

        Asleep (no wake-ups at all) while the kernel takes every frame directly.
        Closes the connection with 4008 and ``slow_reason()`` (default "slow
        consumer") once it became a slow consumer. Returns when the connection is
        closed or broken; raises nothing else but Cancelled. Cancel-safe: bytes are
        only written synchronously after a wait, so a cancelled writer leaves the
        pending frames intact for ``close()`` to flush.
        """
        if self._writer_task is not None:
            raise RuntimeError("a writer is already running for this connection")
        await self._writer(park=True)

    async def _write_until_flushed(self) -> None:
        await self._writer(park=False)

    async def _writer(self, park: bool) -> None:
        task = self._writer_task = trio.lowlevel.current_task()
        try:
            while self._state != _CLOSED:
                if self._write_failed:
                    await self._close(None, ws.CLOSE_ABNORMAL, "connection lost", _HANG_UP)
                elif self._slow and self._close_done is None:
                    reason = self._slow_reason() if self._slow_reason else "slow consumer"
                    frame = ws.encode_close(ws.CLOSE_SLOW_CONSUMER, reason)
                    await self._close(frame, ws.CLOSE_SLOW_CONSUMER, reason, _AWAIT_CLOSE)
                elif not self._pending or self._flushing:
                    if not park:
                        return
                    self._parked = task
                    await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                else:
                    await trio.lowlevel.wait_writable(self._sock)
                    self._write_pending()
        except trio.ClosedResourceError:
            pass  # close() in another task closed the socket while we waited on it
        except OSError:  # the socket was closed behind our back
            self._on_write_error()
        finally:
            self._writer_task = None
            self._parked = None
            if self._drained is not None:
                self._drained.set()

    async def _drain(self) -> None:
        """Write all pending bytes, through the writer task when it is running."""
        while self._pending:
            writer = self._writer_task
            if writer is not None and writer is not trio.lowlevel.current_task():
                self._drained = trio.Event()
                self._wake_writer()
                await self._drained.wait()
            else:
                # The writer may start while we wait; _flushing keeps it parked, as
                # trio allows only one task to wait for writability of a socket.
                self._flushing = True
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                finally:
                    self._flushing = False
                    self._wake_writer()
                self._write_pending()

    # --- the read path ------------------------------------------------------------

    async def receive(self) -> tuple[int, bytes]:
        """The next data message as ``(opcode, payload)``; opcode 2 binary, 1 text.

        Answers pings, ignores pongs, and completes the close handshake. Raises
        ConnectionClosed when the peer closes (its code), when the peer violates the
        protocol (after closing with 1002/1007/1009), when the connection breaks
        (1006) or after our own close (our code). Cancel-safe: no message is lost
        when cancelled.
        """
        while True:
            msgs = self._inbox
            if msgs is not None:
                i = self._inbox_pos
                while i < len(msgs):
                    msg = msgs[i]
                    i += 1
                    op = msg[0]
                    if op < ws.OP_CLOSE:
                        if self._state == _OPEN:
                            self._inbox_pos = i
                            return msg
                    elif op == ws.OP_PING:
                        if self._state == _OPEN:
                            self.deliver(ws.encode_pong(msg[1]))
                    elif op == ws.OP_CLOSE:
                        self._inbox = None
                        await self._on_peer_close()
                self._inbox = None
            if self._state != _OPEN and (self._peer_close_event is None or self._peer_closed):
                # Another task is closing and not waiting on us to read the peer's close.
                await self._close(None, ws.CLOSE_ABNORMAL, "", _HANG_UP)
                raise self._closed_error()
            # Wait here, not in a helper: every parked reader keeps this stack.
            self._receiving = True
            try:
                if self._hub is None:
                    await trio.lowlevel.wait_readable(self._sock)
                elif self._readable:
                    await trio.lowlevel.checkpoint()  # more may be waiting: read it after others ran
                else:
                    self._read_task = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(self._abort_read)
                data = raw_recv(self._sock)
            except BlockingIOError:
                self._readable = False
                continue  # a spurious wake-up
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                await self._receive_failed(exc)
            finally:
                self._receiving = False
            if len(data) < RECEIVE_SIZE:
                self._readable = False  # drained: the next arrival is a new edge for the hub
            if not data:
                await self._receive_failed(None)
            self._reader.feed(data)
            try:
                msgs = self._reader.next_messages()
            except ws.ProtocolViolation as exc:
                self._peer_gone()
                frame = ws.encode_close(exc.close_code, exc.reason)
                await self._close(frame, exc.close_code, exc.reason, _LINGER)
                raise ConnectionClosed(exc.close_code, exc.reason) from exc
            if len(msgs) == 1 and msgs[0][0] == ws.OP_BINARY and self._state == _OPEN:
                return msgs[0]  # the common case: one binary message per read
            self._inbox = msgs
            self._inbox_pos = 0

    def read_ready(self) -> None:
        """The hub saw the socket become readable (or hang up): wake a parked receive."""
        self._readable = True
        task = self._read_task
        if task is not None:
            self._read_task = None
            trio.lowlevel.reschedule(task)

    def _abort_read(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        self._read_task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def _receive_failed(self, exc: BaseException | None) -> NoReturn:
        """The socket read failed (``exc``) or hit EOF (None): close and raise."""
        if isinstance(exc, trio.ClosedResourceError) or self._state == _CLOSED:
            raise self._closed_error() from None  # close() in another task closed it
        self._peer_gone()
        reason = "connection lost" if exc is not None else "closed without a close frame"
        await self._close(None, ws.CLOSE_ABNORMAL, reason, _HANG_UP)
        raise self._closed_error() from exc

    async def _on_peer_close(self) -> None:
        code, reason = self._reader.close_code or ws.CLOSE_NO_STATUS, self._reader.close_reason
        self._peer_gone()
        if self._close_done is None:  # the peer started it: echo its code, then hang up
            echo = ws.encode_close(None if code == ws.CLOSE_NO_STATUS else code)
            await self._close(echo, code, reason, _HANG_UP)
            raise ConnectionClosed(code, reason)
        raise self._closed_error()

    def _peer_gone(self) -> None:
        """The peer will send nothing more (close frame, EOF, error or violation)."""
        self._peer_closed = True
        if self._peer_close_event is not None:
            self._peer_close_event.set()

    def _closed_error(self) -> ConnectionClosed:
        code = self.close_code if self.close_code is not None else ws.CLOSE_ABNORMAL
        return ConnectionClosed(code, self.close_reason)

    # --- closing --------------------------------------------------------------------

    async def close(self, code: int = ws.CLOSE_NORMAL, reason: str = "") -> None:
        """Close the WebSocket with ``code``; idempotent, bounded by ``close_timeout``.

        Flushes what is pending, sends the close frame, waits for the peer's close
        (unless it already came), then closes the stream - or closes it when the
        deadline passes. A second call waits for the first to finish. Raises
        ValueError for a code that may not be sent. Cancel-safe: if cancelled, the
        stream is still closed (abruptly).
        """
        await self._close(ws.encode_close(code, reason), code, reason, _AWAIT_CLOSE)

    async def _close(self, frame: bytes | None, code: int, reason: str, then: int) -> None:
        if self._close_done is not None:
            if not self._close_done.is_set():  # another task is closing: wait for it
                with trio.move_on_after(self._close_timeout):
                    await self._close_done.wait()
            return
        self._close_done = trio.Event()
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if frame is None or self._state != _OPEN or self._write_failed:
            self._closed()  # nothing to send or wait for (a broken or vanished peer)
            return
        try:
            with trio.move_on_after(self._close_timeout):
                self._state = _CLOSING
                self._direct = False
                self._pending.append(frame)
                self._pending_size += len(frame)
                await self._drain()
                if self._write_failed:
                    pass
                elif then == _LINGER:
                    await self._linger()
                elif then == _AWAIT_CLOSE and not self._peer_closed:
                    await self._await_peer_close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer is gone: nothing left to flush or wait for
        finally:
            self._closed()

    def _closed(self) -> None:
        self._state = _CLOSED
        self._direct = False
        self._pending.clear()
        self._pending_size = 0
        # A parked writer wakes up to see the close and end; no new one is started for a
        # closed connection (when 19,000 clients drop at once that was a task each).
        self._writer_nursery = None
        self._wake_writer()
        if self._hub is not None:
            # Before the close: the descriptor number may be reused at once.
            self._hub.unwatch(self._sock.fileno())
            self._hub = None
            task, self._read_task = self._read_task, None
            if task is not None:
                trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError("the connection was closed")))
        # SocketStream.aclose() is socket.close() plus a checkpoint; the plain
        # close cannot be interrupted by a cancellation that is under way.
        self._stream.socket.close()
        self._close_done.set()

    async def _await_peer_close(self) -> None:
        if self._receiving:  # a receive() is reading: it reports the peer's close
            self._peer_close_event = trio.Event()
            await self._peer_close_event.wait()
            return
        reader = self._reader
        while not self._peer_closed:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            reader.feed(data)
            try:
                reader.next_messages()  # data arriving after our close is dropped
            except ws.ProtocolViolation:
                await self._linger()
                return
            if not data or reader.close_code is not None:
                self._peer_gone()

    async def _linger(self) -> None:
        # Closing a socket with unread input makes the kernel send a reset, which
        # can destroy our close frame before the peer reads it: half-close instead
        # and discard what the peer still sends until it hangs up.
        await self._stream.send_eof()
        while await self._stream.receive_some(RECEIVE_SIZE):
            pass
