"""Typing indicators: in memory only, expiring on the server.

``start`` broadcasts once and then only extends the deadline while the user
keeps typing (refreshes inside the TTL are coalesced); ``stop``, the TTL
running out, or the connection that last said "typing" closing broadcasts
``active: false``. The typer's own sessions are not told.
"""

from __future__ import annotations

from typing import Callable

import trio

from chatd.registry.rooms import Rooms
from chatd.registry.sessions import Session

Encode = Callable[[dict], bytes]


class Typing:
    def __init__(self, rooms: Rooms, encode: Encode, *, ttl: float) -> None:
        self.rooms = rooms
        self.encode = encode
        self.ttl = ttl
        # (room, user) -> (deadline, the connection that last said "typing")
        self.active: dict[tuple[int, str], tuple[float, Session]] = {}

    def _send(self, room_id: int, user_id: str, active: bool) -> None:
        frame = self.encode({"type": "typing", "room_id": room_id, "user_id": user_id, "active": active})
        self.rooms.broadcast(room_id, frame, skip_user=user_id)

    def update(self, room_id: int, session: Session, active: bool) -> None:
        key = (room_id, session.user_id)
        if active:
            fresh = key not in self.active
            self.active[key] = (trio.current_time() + self.ttl, session)
            if fresh:
                self._send(room_id, session.user_id, True)
        elif self.active.pop(key, None) is not None:
            self._send(room_id, session.user_id, False)

    def clear_session(self, session: Session) -> None:
        """The connection closed: end what it was typing (docs/protocol.md §11)."""
        for key in [k for k, (_, typist) in self.active.items() if typist is session]:
            del self.active[key]
            self._send(key[0], key[1], False)

    def expire(self) -> None:
        now = trio.current_time()
        for key in [k for k, (deadline, _) in self.active.items() if deadline <= now]:
            del self.active[key]
            self._send(key[0], key[1], False)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.ttl / 4)
            self.expire()
