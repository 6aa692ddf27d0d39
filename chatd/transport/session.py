"""One client connection, from the WebSocket upgrade to the close.

The connection's nursery holds this task, the reader, and a writer task only
while the outbox has something to flush; the nursery's deadline is the token's
expiry. An idle connection is one parked task. Data path per frame:
bytes -> FrameReader (transport) -> CommandDecoder (protocol) -> handler
(service) -> one reply frame. A handler that fails unexpectedly closes only
this connection (1011) and logs the traceback.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import structlog
import trio

from chatd import collector, errors
from chatd.log import Repeats
from chatd.protocol import codec
from chatd.protocol import messages as m
from chatd.protocol.closecodes import CloseCode, handshake_close_code
from chatd.protocol.websocket import OP_TEXT
from chatd.service import commands
from chatd.service.runtime import Service, frame
from chatd.transport.websocket import ConnectionClosed, WebSocketConnection

if TYPE_CHECKING:
    from chatd.transport.listener import Listener

log = structlog.get_logger("chatd.ws")
_conn_ids = itertools.count(1)


class RateLimit:
    """Token bucket: ``rate`` commands per second with bursts of ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 if a command may run now, else seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


async def handle_connection(stream: trio.SocketStream, listener: Listener) -> None:
    """Upgrade one accepted stream and serve it until it closes. Never raises (but Cancelled).

    One coroutine from accept to close: this frame is on the stack of every idle
    connection, so nothing here is split into helpers that would stay parked too.
    """
    conn = await listener.upgrade(stream)
    if conn is None:
        return
    service = listener.service
    conn_id = next(_conn_ids)
    leeway = service.config.auth.leeway
    session = None
    try:
        async with trio.open_nursery() as nursery:
            conn.write_on_demand(nursery)
            try:
                session = await _hello(conn, service, conn_id)
                if session is not None:
                    session.expiry = nursery.cancel_scope
                    session.expire_at(session.expires_at, leeway)
                    await _read_commands(conn, service, session, conn_id, listener.unavailable)
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("ws.internal_error", conn_id=conn_id)
                await conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            finally:
                nursery.cancel_scope.cancel()
        if session is not None and conn.is_open and session.expired(leeway):
            await conn.close(CloseCode.TOKEN_EXPIRED, "token expired: refresh before token_expires_at")
    finally:
        try:
            if session is not None:
                session.expiry = None
                await service.close_session(session)
                log.info("ws.closed", conn_id=conn_id, user_id=session.user_id)
        finally:
            await listener.release(conn)


async def _refuse(conn: WebSocketConnection, request_id: Any, err: errors.ChatdError, code: int, reason: str) -> None:
    conn.deliver(frame(codec.encode_error(request_id, err)))
    await conn.close(code, reason)


async def _hello(conn: WebSocketConnection, service: Service, conn_id: int):
    """Wait for hello, authenticate, open the session and send welcome.

    Returns the session, or None after answering with an error frame and closing
    (docs/protocol.md §3: the close code follows the error).
    """
    received = None
    with trio.move_on_after(service.config.websocket.hello_timeout):
        received = await conn.receive()
    if received is None:
        await conn.close(CloseCode.AUTH_TIMEOUT, "no hello in time")
        return None
    opcode, payload = received
    if opcode == OP_TEXT:
        await conn.close(CloseCode.UNSUPPORTED_DATA, "binary MessagePack frames only")
        return None
    request_id = None
    try:
        cmd = service.decoder.decode(payload)
        request_id = cmd.id
        if not isinstance(cmd, m.Hello):
            raise errors.Unauthorized("the first frame must be hello")
        identity = await service.authenticate(cmd.token)
        session, welcome = await service.open_session(conn, identity, cmd)
    except errors.ChatdError as exc:
        if request_id is None:
            request_id = getattr(exc, "request_id", None)
        service.command_errors[exc.code] += 1
        log.info("ws.hello_refused", conn_id=conn_id, code=exc.code, message=exc.message)
        await _refuse(conn, request_id, exc, handshake_close_code(exc), exc.code)
        return None
    conn.deliver(frame(codec.encode_result(cmd.id, welcome)))
    session.release()  # events fanned out meanwhile follow the welcome
    log.info("ws.hello", conn_id=conn_id, user_id=identity.user_id, device=session.device)
    return session


RATE_LIMITED_BURSTS = 5
_MALFORMED = (errors.BadFrame, errors.UnknownCommand, errors.InvalidField, errors.TooLarge)


async def _read_commands(conn: WebSocketConnection, service: Service, session, conn_id: int, unavailable: Repeats) -> None:
    """Decode and dispatch commands until the connection closes.

    Abuse closes with 1008: more than ``websocket.max_bad_frames`` malformed
    commands in a row, or more than five bursts (``limits.command_burst``) of
    commands in a row sent while told to wait. Pipelined commands already on the
    wire cannot react to ``retry_after``, hence the margin.
    """
    cfg = service.config
    bucket = RateLimit(cfg.limits.commands_per_second, cfg.limits.command_burst)
    malformed = limited = 0
    decode = service.decoder.decode
    handlers = commands.HANDLERS
    async_handlers = commands.ASYNC_HANDLERS
    command_done = collector.command_done
    while True:
        opcode, payload = await conn.receive()
        command_done()
        if opcode == OP_TEXT:
            await conn.close(CloseCode.UNSUPPORTED_DATA, "binary MessagePack frames only")
            return
        request_id = None
        try:
            cmd = decode(payload)
            request_id = cmd.id
            wait = bucket.take()
            if wait:
                raise errors.RateLimited("slow down", retry_after=round(wait, 3))
            handler = handlers[type(cmd)]
            if handler in async_handlers:
                result = await handler(service, session, cmd)
            else:
                result = handler(service, session, cmd)
        except errors.ChatdError as exc:
            if request_id is None:
                request_id = getattr(exc, "request_id", None)
            service.command_errors[exc.code] += 1
            if isinstance(exc, errors.RateLimited):
                limited += 1
                if limited == 1:
                    log.info("ws.rate_limited", conn_id=conn_id, user_id=session.user_id, retry_after=exc.retry_after)
                abusive = limited > RATE_LIMITED_BURSTS * cfg.limits.command_burst
            elif isinstance(exc, _MALFORMED):
                malformed += 1
                log.info("ws.bad_command", conn_id=conn_id, user_id=session.user_id, code=exc.code, message=exc.message)
                abusive = malformed > cfg.websocket.max_bad_frames
            else:
                abusive = False
                if isinstance(exc, errors.Unavailable):  # shedding load or a dependency down: floods, so one line a second
                    unavailable(conn_id=conn_id, user_id=session.user_id, message=exc.message)
            if abusive:
                await _refuse(conn, request_id, exc, CloseCode.POLICY_VIOLATION, "too many bad or rate-limited commands")
                return
            conn.deliver(frame(codec.encode_error(request_id, exc)))
            continue
        malformed = limited = 0  # both thresholds count in a row
        if result is not commands.PENDING:
            conn.deliver(frame(codec.encode_result(request_id, result)))
