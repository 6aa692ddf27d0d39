"""The reconnecting chatd client: ``open_client(url, token_provider) as client``.

Three tasks in the client's nursery:

- the **session loop** (``_run``) connects, keeps the token fresh, and after a lost
  connection reconnects with exponential backoff and jitter, or stops, as the close
  code says (docs/protocol.md §7, :data:`chatd.protocol.closecodes.CLOSE_CODES`);
- each connection's **reader** routes replies to waiting requests and puts every
  other frame in that connection's bounded inbox (an overflowing inbox drops the
  connection like the server's 4008 would: nothing is lost, the next one resyncs);
- the **event stream** (:mod:`chatd.client.stream`) catches up after each (re)connect with ``sync``,
  then hands the inbox to ``events()``: durable events exactly once and in seq order
  per room (deduped, gaps fetched with ``history``), ephemeral frames as they come.

Requests are pipelined and each has a deadline (``request_timeout``). A command
whose reply was lost with the connection is sent again on the next one when that is
safe: durable commands keep their client id (the server answers the retry as a
duplicate) and reads, ``mark_read``, presence and typing are safe to repeat.
"""

from __future__ import annotations

import inspect
import random
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import structlog
import trio

from chatd import errors
from chatd.client.commands import DURABLE_KEYS, RETRY_SAFE, Commands, new_client_id
from chatd.client.connection import Connection, _reraise, open_connection
from chatd.client.errors import ClientStopped, ConnectionLost, Disconnected
from chatd.client.stream import EventStream
from chatd.client.timeline import Timeline
from chatd.protocol.closecodes import CloseCode, describe, handshake_close_code

log = structlog.get_logger("chatd.client")

Source = Union[str, Callable[[], Union[str, Awaitable[str]]]]
CLIENT_NAME = "chatd-client/1"
_LOCAL_SLOW = int(CloseCode.SLOW_CONSUMER)  # our own inbox overflowed: resume like the server's 4008
_STEADY = 2.0  # a session that lived this long resets the backoff


async def _resolve(source: Source) -> str:
    value = source() if callable(source) else source
    if inspect.isawaitable(value):
        value = await value
    return value  # type: ignore[return-value]


class Client(Commands):
    """A chatd session that survives disconnects. Create it with :func:`open_client`.

    ``welcome`` is the latest welcome frame (a dict); ``user_id`` its user;
    ``positions`` the last seq handed to ``events()`` per room (save it and pass it back
    as ``state`` to resume later); ``connection`` the live Connection or None.
    """

    def __init__(
        self,
        url: Source,
        token_provider: Source,
        *,
        device: str | None = None,
        client_name: str = CLIENT_NAME,
        reconnect: bool = True,
        backoff: tuple[float, float] = (0.2, 10.0),
        request_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        state: dict[int, int] | None = None,
        events: bool = True,
        event_buffer: int = 10_000,
        max_in_flight: int | None = 16,
    ) -> None:
        self.welcome: dict[str, Any] | None = None
        self.connection: Connection | None = None
        self.stopped: ClientStopped | None = None
        self._url = url
        self._token_provider = token_provider
        self._device = device
        self._client_name = client_name
        self._reconnect = reconnect
        self._backoff = backoff
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._events_enabled = events
        self._event_buffer = event_buffer
        # A short hand-off queue: what waits for a slow reader waits in the inbox, where
        # event_buffer bounds it.
        self._stream = EventStream(Timeline(state), request_timeout=request_timeout, buffer=min(64, event_buffer))
        self._presence_status = "online"
        self._presence_watching: set[str] = set()
        self._changed = trio.Event()  # replaced each time connection/stopped changes
        self._nursery: trio.Nursery | None = None
        self._goaway_ms: int | None = None  # from the last goaway: how long to wait after 4009
        # The server closes with 1008 after max_bad_frames (default 20) rate_limited
        # replies in a row: bound what is on the wire, and after a rate_limited hold
        # every new write until its retry_after.
        self._in_flight = trio.Semaphore(max_in_flight) if max_in_flight else None
        self._resume_at = 0.0
        self._one_at_a_time = trio.Lock()

    @property
    def user_id(self) -> str | None:
        return self.welcome["user"]["id"] if self.welcome else None

    @property
    def positions(self) -> dict[int, int]:
        return self._stream.timeline.positions()

    def events(self) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """The stream of server frames, for ``async for`` (one consumer).

        Durable ``event`` frames come exactly once, in seq order per room, across any
        number of reconnects; events fetched to fill a gap come from history/sync, so a
        ``message`` arrives in its current state (edited/deleted/reactions folded in).
        Also: ``{"type": "snapshot", "room_id", "snapshot"}`` when a room was too far
        behind (the stream goes on from ``snapshot["last_seq"]``), ``{"type": "removed",
        "room_id"}`` when the user is no longer in a room, and ephemeral frames
        (typing, receipt, presence, goaway) as they arrive. Ends when the client stops.
        Read it: a client that does not read it drops and resyncs its connection when
        ``event_buffer`` frames are waiting (or pass ``events=False``).
        """
        if not self._events_enabled:
            raise RuntimeError("this client was opened with events=False")
        return self._stream.receive_channel

    # --- requests -------------------------------------------------------------------

    async def request(self, type_: str, /, **fields: Any) -> dict[str, Any]:
        """Send command ``type_`` with ``fields`` (None values are left out); return its result.

        Waits for a connection if there is none. Durable commands without a client id
        get one. Retries by itself, within the deadline: a lost reply of a retry-safe
        command (after reconnecting), and ``rate_limited`` / ``unavailable`` after
        ``retry_after``. Raises the chatd error of the server's reply, ConnectionLost
        (reply of a command not known to be safe was lost), ClientStopped, or
        chatd.errors.Timeout after ``request_timeout``. Safe to cancel.
        """
        cmd = {"type": type_, **{k: v for k, v in fields.items() if v is not None}}
        key = DURABLE_KEYS.get(type_)
        if key is not None and key not in cmd:
            cmd[key] = new_client_id()
        retry_safe = type_ in RETRY_SAFE
        try:
            with trio.fail_after(self._request_timeout):
                lost: Connection | None = None
                while True:
                    conn = await self._live_connection(not_this=lost)
                    try:
                        return await self._paced(conn, cmd)
                    except ConnectionLost:
                        if self.stopped is not None:
                            raise self._stopped_error() from None
                        if not retry_safe:
                            raise
                        lost = conn
                    except (errors.RateLimited, errors.Unavailable) as exc:
                        self._resume_at = max(self._resume_at, trio.current_time() + exc.retry_after)
                        if not retry_safe:
                            raise
                        lost = None
        except trio.TooSlowError:
            raise errors.Timeout(
                f"{type_} got no reply within {self._request_timeout} s", command=type_
            ) from None

    async def _paced(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        if self._in_flight is None:
            return await self._after_pause(conn, cmd)
        async with self._in_flight:  # take the slot first: the pause must bind queued requests too
            return await self._after_pause(conn, cmd)

    async def _after_pause(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        if trio.current_time() >= self._resume_at:
            return await conn.request(cmd)
        # Paused by a rate_limited: requests queued meanwhile go one at a time, so a
        # server still out of tokens rejects one of them, not a whole window.
        async with self._one_at_a_time:
            while trio.current_time() < self._resume_at:
                await trio.sleep_until(self._resume_at)
            return await conn.request(cmd)

    async def _live_connection(self, not_this: Connection | None = None) -> Connection:
        while True:
            if self.stopped is not None:
                raise self._stopped_error()
            conn = self.connection
            if conn is not None and conn is not not_this and conn.is_open:
                return conn
            await self._changed.wait()

    def _stopped_error(self) -> ClientStopped:
        # A fresh exception per caller: one instance raised in many tasks would share a traceback.
        s = self.stopped
        assert s is not None
        return ClientStopped(s.close_code, s.reason, error=s.error, message=s.message)

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    # --- lifecycle -------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection (1000) and stop: pending calls raise ClientStopped. Idempotent."""
        self._stop(ClientStopped(1000, "client closed", message="client closed"))
        conn = self.connection
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _stop(self, stopped: ClientStopped) -> None:
        if self.stopped is None:
            self.stopped = stopped
            self._stream.close()  # the pump finishes the last inbox, then events() ends
            self._notify()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve sessions, reconnect; started means the first welcome arrived.

        Before that, a failure the close code says not to retry raises ClientStopped,
        and so does reaching ``connect_timeout`` without a session (the last error is its
        cause). Afterwards it never raises: it stops the client.
        """
        failures = 0
        give_up_at = trio.current_time() + self._connect_timeout
        while self.stopped is None:
            began = trio.current_time()
            started = self.welcome is not None
            code, reason, error, welcomed = await self._session(task_status if not started else None)
            started = self.welcome is not None
            if self.stopped is not None:
                return
            info = describe(code)
            if not (self._reconnect and info.reconnect) or (not started and trio.current_time() >= give_up_at):
                stopped = ClientStopped(code, reason, error=None if isinstance(error, Disconnected) else error)
                if not started:
                    raise stopped from error
                log.warning("client.stopped", close_code=code, reason=reason)
                self._stop(stopped)
                return
            if welcomed and trio.current_time() - began >= _STEADY:
                failures = 0
            delay = self._delay(code, failures)
            failures += 1
            log.info("client.reconnecting", close_code=code, reason=reason, delay=round(delay, 3))
            await trio.sleep(delay)

    def _delay(self, code: int, failures: int) -> float:
        first, cap = self._backoff
        goaway, self._goaway_ms = self._goaway_ms, None
        if code == CloseCode.DRAINING and goaway is not None:
            return goaway / 1000 * random.uniform(1.0, 1.5)
        if code == CloseCode.SLOW_CONSUMER and failures == 0:
            return 0.0
        if code == CloseCode.POLICY_VIOLATION:
            return cap * random.uniform(1.0, 1.5)
        return min(cap, first * 2**failures) * random.uniform(0.5, 1.5)

    async def _session(self, task_status: trio.TaskStatus[None] | None) -> tuple[int, str, errors.ChatdError | None, bool]:
        """One connection from connect to close: (close code, reason, error, welcomed).

        ``task_status`` (first session only) is told started once the welcome is in.
        """
        inbox_send, inbox_recv = trio.open_memory_channel[dict[str, Any]](self._event_buffer)
        conn: Connection | None = None
        try:
            url = await _resolve(self._url)
            token = await _resolve(self._token_provider)
            async with open_connection(
                url, token, on_frame=self._frame_handler(inbox_send),
                connect_timeout=self._connect_timeout, client=self._client_name, device=self._device,
            ) as conn:  # fmt: skip
                self.connection, self.welcome = conn, conn.welcome
                if self._events_enabled:
                    self._stream.add_session(conn, inbox_recv)
                self._notify()
                if task_status is not None:
                    task_status.started()
                log.info("client.connected", user_id=self.user_id, session_id=conn.welcome.get("session_id"))
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self._keep_token_fresh, conn)
                    tasks.start_soon(self._restore_presence, conn, inbox_send)
                    await conn.wait_closed()
                    tasks.cancel_scope.cancel()
            return conn.close_code or 1006, conn.close_reason, None, True
        except Disconnected as exc:
            return exc.close_code, exc.reason, exc, conn is not None
        except errors.ChatdError as exc:  # the server refused the hello; its close code follows the error
            return int(handshake_close_code(exc)), exc.code, exc, False
        except Exception as exc:
            if self.welcome is None:
                raise  # a broken url or token_provider: tell the caller at once
            log.exception("client.session_failed")
            return 1011, f"client error: {exc!r}", None, conn is not None
        finally:
            inbox_send.close()
            if self.connection is conn and conn is not None:
                self.connection = None
                self._notify()

    def _frame_handler(self, inbox: trio.MemorySendChannel[dict[str, Any]]) -> Callable[[Connection, dict], None]:
        def on_frame(conn: Connection, frame: dict[str, Any]) -> None:
            if frame["type"] == "goaway" and type(frame.get("reconnect_after_ms")) is int:
                self._goaway_ms = frame["reconnect_after_ms"]
            if not self._events_enabled:
                return
            try:
                inbox.send_nowait(frame)
            except trio.WouldBlock:
                log.warning("client.event_buffer_full", buffered=self._event_buffer)
                conn.abort(_LOCAL_SLOW, "client event buffer overflow")
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # stopping, or the pump gave this connection up (it is being dropped)

        return on_frame

    async def _keep_token_fresh(self, conn: Connection) -> None:
        """Send ``refresh`` with a new token at ~80 % of each token's lifetime."""
        expires = float(conn.welcome.get("token_expires_at") or 0)
        issued = time.time()
        while conn.is_open and expires:
            await trio.sleep(max(0.8 * (expires - issued), 0.5))
            try:
                token = await _resolve(self._token_provider)
                with trio.fail_after(self._request_timeout):
                    result = await conn.request({"type": "refresh", "token": token})
            except Disconnected:
                return
            except Exception as exc:  # retry sooner; the server closes with 4004 if it never works
                log.warning("client.refresh_failed", error=repr(exc))
                issued = time.time()
                continue
            expires, issued = float(result["token_expires_at"]), time.time()

    async def _restore_presence(self, conn: Connection, inbox: trio.MemorySendChannel[dict[str, Any]]) -> None:
        """Presence state is per connection: set it again on a new one."""
        try:
            with trio.fail_after(self._request_timeout):
                if self._presence_status != "online":
                    await conn.request({"type": "set_presence", "status": self._presence_status})
                if self._presence_watching:
                    result = await conn.request({"type": "subscribe_presence", "user_ids": sorted(self._presence_watching)})
                    if self._events_enabled:
                        inbox.send_nowait({"type": "presence", "users": result.get("presence", [])})
        except (errors.ChatdError, trio.TooSlowError, trio.WouldBlock, trio.ClosedResourceError) as exc:
            log.info("client.presence_restore_failed", error=repr(exc))


@asynccontextmanager
async def open_client(url: Source, token_provider: Source, **options: Any) -> AsyncIterator[Client]:
    """Connect (waiting for the first welcome) and yield a reconnecting :class:`Client`.

    ``url`` and ``token_provider`` are a str or a sync/async callable returning one; both
    are called on every (re)connect, the token provider also before each token refresh.
    Options: ``device``, ``client_name``, ``reconnect`` (default True), ``backoff``
    (first, max seconds; default (0.2, 10.0)), ``request_timeout`` (10 s),
    ``connect_timeout`` (10 s: also how long the first connect is retried), ``state``
    (``{room_id: seq}`` to resume from; default: start from now), ``events`` (False for
    a send-only client), ``event_buffer`` (frames held for ``events()``), ``max_in_flight``
    (requests on the wire at once, default 16, None = unbounded: keep it below the
    server's ``max_bad_frames`` or a burst past the rate limit closes the connection).

    Raises ClientStopped when the first connect fails for good (e.g. 4003 with
    ``.error`` Unauthorized) or does not succeed within ``connect_timeout``. On exit the
    connection is closed with 1000.
    """
    client = Client(url, token_provider, **options)
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            if client._events_enabled:
                nursery.start_soon(client._stream.run)
            await nursery.start(client._run)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # Callers expect their own exception (or ours), not a group of one.
        rest = group.split(trio.Cancelled)[1]
        if rest is None or len(rest.exceptions) != 1 or isinstance(rest.exceptions[0], BaseExceptionGroup):
            raise
        _reraise(rest.exceptions[0])
