"""Typing indicators: in memory only, expiring on the server.

``start`` broadcasts once and then only extends the deadline while the user
keeps typing (refreshes inside the TTL are coalesced); ``stop``, the TTL
running out, or the user's last connection closing broadcasts ``active: false``.
The typer's own sessions are not told.
"""

from __future__ import annotations

from typing import Callable

import trio

from chatd.registry.rooms import Rooms

Encode = Callable[[dict], bytes]


class Typing:
    def __init__(self, rooms: Rooms, encode: Encode, *, ttl: float) -> None:
        self.rooms = rooms
        self.encode = encode
        self.ttl = ttl
        self.active: dict[tuple[int, str], float] = {}

    def _send(self, room_id: int, user_id: str, active: bool) -> None:
        frame = self.encode({"type": "typing", "room_id": room_id, "user_id": user_id, "active": active})
        self.rooms.broadcast(room_id, frame, skip_user=user_id)

    def update(self, room_id: int, user_id: str, active: bool) -> None:
        key = (room_id, user_id)
        if active:
            fresh = key not in self.active
            self.active[key] = trio.current_time() + self.ttl
            if fresh:
                self._send(room_id, user_id, True)
        elif self.active.pop(key, None) is not None:
            self._send(room_id, user_id, False)

    def clear_user(self, user_id: str, room_ids: set[int] | None = None) -> None:
        for key in [k for k in self.active if k[1] == user_id and (room_ids is None or k[0] in room_ids)]:
            del self.active[key]
            self._send(key[0], user_id, False)

    def expire(self) -> None:
        now = trio.current_time()
        for key in [k for k, deadline in self.active.items() if deadline <= now]:
            del self.active[key]
            self._send(key[0], key[1], False)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.ttl / 4)
            self.expire()
