"""One method per protocol v1 command (docs/protocol.md §4), on top of ``request``.

Every method returns the result fields as a dict (``send`` -> ``{"seq", "at",
"duplicate"}``, ``create_group`` -> ``{"room": RoomInfo}``, ...) and raises the chatd
error of the server's error frame (NotFound, Forbidden, Conflict, RateLimited...),
chatd.errors.Timeout after ``request_timeout``, or ClientStopped. Durable commands
take an optional client id; without one a fresh uuid4 is made per call and kept
across the client's own retries, so a retried command never runs twice.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Iterable

__all__ = ["DURABLE_KEYS", "RETRY_SAFE", "Commands", "new_client_id"]

# Durable command -> the field carrying its client id (docs/protocol.md §8).
DURABLE_KEYS: dict[str, str] = {
    "send": "client_msg_id",
    **{
        name: "client_id"
        for name in (
            "create_dm", "create_group", "join", "leave", "add_member", "remove_member",
            "set_role", "update_room", "edit", "delete", "react", "unreact",
        )
    },
}  # fmt: skip
# Commands that may be sent again after a lost reply without changing the outcome.
RETRY_SAFE: frozenset[str] = frozenset(DURABLE_KEYS) | {
    "mark_read", "typing", "set_presence", "subscribe_presence", "unsubscribe_presence",
    "history", "sync", "ping", "refresh",
}  # fmt: skip


def new_client_id() -> str:
    return uuid.uuid4().hex


class Commands:
    """Mixin: the typed commands; the class using it provides ``request``."""

    async def request(self, type_: str, /, **fields: Any) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    # --- messages -------------------------------------------------------------------

    async def send(
        self, room_id: int, body: str, *, reply_to: int | None = None, client_msg_id: str | None = None
    ) -> dict[str, Any]:
        """Post a message; ``{"seq", "at", "duplicate"}`` (duplicate: this id was used before)."""
        return await self.request(
            "send", room_id=room_id, body=body, reply_to=reply_to, client_msg_id=client_msg_id or new_client_id()
        )

    async def edit(self, room_id: int, seq: int, body: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("edit", room_id=room_id, seq=seq, body=body, client_id=client_id or new_client_id())

    async def delete(self, room_id: int, seq: int, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("delete", room_id=room_id, seq=seq, client_id=client_id or new_client_id())

    async def react(self, room_id: int, seq: int, emoji: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("react", room_id=room_id, seq=seq, emoji=emoji, client_id=client_id or new_client_id())

    async def unreact(self, room_id: int, seq: int, emoji: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request(
            "unreact", room_id=room_id, seq=seq, emoji=emoji, client_id=client_id or new_client_id()
        )

    # --- rooms and membership ---------------------------------------------------------

    async def create_group(
        self, title: str, members: Iterable[str] = (), public: bool = False, *, client_id: str | None = None
    ) -> dict[str, Any]:
        """Create a group owned by this user; ``{"room": RoomInfo}``."""
        return await self.request(
            "create_group", title=title, members=list(members), public=public, client_id=client_id or new_client_id()
        )

    async def create_dm(self, user_id: str, *, client_id: str | None = None) -> dict[str, Any]:
        """The DM with ``user_id`` (created once, then the same room); ``{"room": RoomInfo}``."""
        return await self.request("create_dm", user_id=user_id, client_id=client_id or new_client_id())

    async def join(self, room_id: int, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("join", room_id=room_id, client_id=client_id or new_client_id())

    async def leave(self, room_id: int, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("leave", room_id=room_id, client_id=client_id or new_client_id())

    async def add_member(
        self, room_id: int, user_id: str, role: str = "member", *, client_id: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "add_member", room_id=room_id, user_id=user_id, role=role, client_id=client_id or new_client_id()
        )

    async def remove_member(self, room_id: int, user_id: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request(
            "remove_member", room_id=room_id, user_id=user_id, client_id=client_id or new_client_id()
        )

    async def set_role(self, room_id: int, user_id: str, role: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request(
            "set_role", room_id=room_id, user_id=user_id, role=role, client_id=client_id or new_client_id()
        )

    async def update_room(self, room_id: int, title: str, *, client_id: str | None = None) -> dict[str, Any]:
        return await self.request("update_room", room_id=room_id, title=title, client_id=client_id or new_client_id())

    # --- read state, signals, presence ----------------------------------------------

    async def mark_read(self, room_id: int, seq: int) -> dict[str, Any]:
        """Advance the read position (monotonic); ``{"read_seq"}``."""
        return await self.request("mark_read", room_id=room_id, seq=seq)

    async def typing(self, room_id: int, active: bool = True) -> dict[str, Any]:
        return await self.request("typing", room_id=room_id, active=active)

    async def set_presence(self, status: str) -> dict[str, Any]:
        """Set this connection's status; the client sets it again after reconnecting."""
        self._presence_status = status
        return await self.request("set_presence", status=status)

    async def subscribe_presence(self, user_ids: Iterable[str]) -> dict[str, Any]:
        """Watch users' presence; ``{"presence": [PresenceInfo]}``. Renewed after reconnecting."""
        users = list(user_ids)
        result = await self.request("subscribe_presence", user_ids=users)
        self._presence_watching.update(users)
        return result

    async def unsubscribe_presence(self, user_ids: Iterable[str]) -> dict[str, Any]:
        users = list(user_ids)
        self._presence_watching.difference_update(users)
        return await self.request("unsubscribe_presence", user_ids=users)

    # --- reading the log, session ---------------------------------------------------

    async def history(
        self, room_id: int, *, before: int | None = None, after: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """One page of the room's log; ``{"events", "has_more"}`` (events ascending)."""
        return await self.request("history", room_id=room_id, before=before, after=after, limit=limit)

    async def sync(self, rooms: dict[int, int], *, limit: int | None = None) -> dict[str, Any]:
        """A raw ``sync`` (the client syncs by itself after reconnecting; this does not move its positions)."""
        return await self.request("sync", rooms=rooms, limit=limit)

    async def ping(self) -> dict[str, Any]:
        """``{"now": server time, "rtt": seconds}`` (rtt includes any wait for a connection)."""
        started = time.monotonic()
        result = await self.request("ping")
        return {**result, "rtt": time.monotonic() - started}

    _presence_status: str = "online"
    _presence_watching: set[str]
