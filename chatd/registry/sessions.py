"""A live client session and the outbox hand-off it offers to fan-out."""

from __future__ import annotations

import itertools
from typing import Any, Protocol

_ids = itertools.count(1)


class Outbox(Protocol):
    def deliver(self, frame: bytes) -> bool: ...


class Session:
    """One authenticated WebSocket connection. Kept small: there may be 20k of them."""

    __slots__ = ("id", "user_id", "device", "outbox", "held", "rooms", "status", "watching", "expires_at", "log", "__weakref__")

    def __init__(self, user_id: str, outbox: Outbox, *, device: str = "", expires_at: float = 0.0, log: Any = None) -> None:
        self.id = next(_ids)
        self.user_id = user_id
        self.device = device
        self.outbox = outbox
        # Frames fanned out while the session opens wait here: nothing may reach
        # the client before its welcome (docs/protocol.md §3). None once released.
        self.held: list[bytes] | None = []
        self.rooms: set[int] = set()
        self.status = "online"          # what this connection asked for: online | away | invisible
        self.watching: set[str] = set() # users whose presence this session subscribed to
        self.expires_at = expires_at
        self.log = log

    def deliver(self, frame: bytes) -> bool:
        """Hand an encoded WebSocket frame to the connection; never waits.

        Held (in order) until :meth:`release`.
        """
        if self.held is not None:
            self.held.append(frame)
            return True
        return self.outbox.deliver(frame)

    def release(self) -> None:
        """The welcome went out: pass on what was held, then deliver directly."""
        held, self.held = self.held, None
        for frame in held or ():
            self.outbox.deliver(frame)

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user_id}>"
