"""The gapless event stream behind ``Client.events()``.

Each welcomed connection hands over its inbox (every non-reply frame, in arrival
order). :meth:`EventStream.run` takes the inboxes one after the other: first it
catches up with ``sync`` from the positions held (docs/protocol.md §9), then it
passes the inbox on — durable events deduped by ``(room_id, seq)`` and any gap
fetched with ``history`` before the event after it, ephemeral frames as they are.
When it cannot keep the stream whole on a connection (a request failed), it drops
that connection; the next one resumes from the same positions, so nothing is lost.
"""

from __future__ import annotations

import math
from typing import Any

import structlog
import trio

from chatd import errors
from chatd.client.connection import Connection
from chatd.client.errors import Disconnected
from chatd.client.timeline import Timeline, Verdict

log = structlog.get_logger("chatd.client")

Inbox = trio.MemoryReceiveChannel[dict[str, Any]]


class EventStream:
    """Owns the per-room positions and the channel ``events()`` reads."""

    def __init__(self, timeline: Timeline, *, request_timeout: float, buffer: int = 256) -> None:
        self.timeline = timeline
        self._request_timeout = request_timeout
        self._out, self.receive_channel = trio.open_memory_channel[dict[str, Any]](buffer)
        self._sessions, self._sessions_recv = trio.open_memory_channel[tuple[Connection, Inbox]](math.inf)

    def add_session(self, conn: Connection, inbox: Inbox) -> None:
        """Queue a freshly welcomed connection. Never blocks; a no-op after :meth:`close`."""
        try:
            self._sessions.send_nowait((conn, inbox))
        except trio.ClosedResourceError:
            inbox.close()

    def close(self) -> None:
        """No more sessions: ``run`` finishes the current inbox, then the stream ends."""
        self._sessions.close()

    async def run(self) -> None:
        """Pump inboxes into the stream until :meth:`close`; never raises but Cancelled."""
        async with self._out:
            async for conn, inbox in self._sessions_recv:
                async with inbox:
                    try:
                        await self._catch_up(conn)
                        async for frame in inbox:
                            await self._route(conn, frame)
                    except trio.BrokenResourceError:  # the consumer closed events()
                        return
                    except errors.ChatdError as exc:
                        if not isinstance(exc, Disconnected):
                            log.warning("client.resync_failed", error=repr(exc))
                            conn.abort(1011, f"client resync failed: {exc.code}")

    async def _call(self, conn: Connection, cmd: dict[str, Any]) -> dict[str, Any]:
        try:
            with trio.fail_after(self._request_timeout):
                return await conn.request(cmd)
        except trio.TooSlowError:
            raise errors.Timeout(f"{cmd['type']} got no reply within {self._request_timeout} s") from None

    async def _catch_up(self, conn: Connection) -> None:
        """After welcome: sync every room from its position until nothing is missing."""
        if not self.timeline.seeded:
            self.timeline.seed_from_welcome(conn.welcome)
            return
        again = True
        while again:
            result = await self._call(conn, {"type": "sync", "rooms": self.timeline.positions()})
            items, again = self.timeline.apply_sync(result)
            for item in items:
                await self._out.send(item)

    async def _route(self, conn: Connection, frame: dict[str, Any]) -> None:
        verdict = self.timeline.classify(frame)
        if verdict is Verdict.DUPLICATE:
            return
        if verdict is Verdict.GAP:
            await self._fill_gap(conn, frame["room_id"], frame["seq"])
        self.timeline.advance(frame)
        await self._out.send(frame)

    async def _fill_gap(self, conn: Connection, room_id: int, seq: int) -> None:
        """Hand out the room's events between its position and ``seq`` (from history)."""
        while self.timeline.position(room_id) < seq - 1:
            after = self.timeline.position(room_id)
            try:
                page = await self._call(conn, {"type": "history", "room_id": room_id, "after": after, "before": seq})
            except errors.NotFound:
                return  # the room is no longer visible: nothing to fill
            for event in self.timeline.accept_page(page.get("events") or []):
                await self._out.send(event)
            if not page.get("has_more") or not page.get("events"):
                return
