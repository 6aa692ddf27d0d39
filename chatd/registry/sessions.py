"""A live client session and the outbox hand-off it offers to fan-out."""

from __future__ import annotations

import itertools
import time
from typing import Protocol

import trio

_ids = itertools.count(1)


class Outbox(Protocol):
    def deliver(self, frame: bytes) -> bool: ...


class Session:
    """One authenticated WebSocket connection. Kept small: there may be 20k of them."""

    __slots__ = ("id", "user_id", "device", "outbox", "held", "deliver", "rooms", "status", "watching", "expires_at", "expiry", "__weakref__")

    def __init__(self, user_id: str, outbox: Outbox, *, device: str = "", expires_at: float = 0.0) -> None:
        self.id = next(_ids)
        self.user_id = user_id
        self.device = device
        self.outbox = outbox
        # Frames fanned out while the session opens wait here: nothing may reach
        # the client before its welcome (docs/protocol.md §3). None once released.
        self.held: list[bytes] | None = []
        # deliver(frame) -> bool | None: hands an encoded WebSocket frame on, never
        # waits; False means the connection refused it (slow consumer, closing).
        # It is the outbox's own method once released: no extra call per
        # recipient on the fan-out path, and no reference cycle.
        self.deliver = self.held.append
        self.rooms: set[int] = set()
        self.status = "online"          # what this connection asked for: online | away | invisible
        # Users whose presence this session subscribed to; a set once there are any.
        self.watching: set[str] | tuple[()] = ()
        self.expires_at = expires_at
        # The connection's cancel scope, whose deadline is the token's expiry (plus
        # leeway) once the session runs: a refresh moves it (see ``expire_at``).
        self.expiry: trio.CancelScope | None = None

    def release(self) -> None:
        """The welcome went out: pass on what was held, then deliver directly."""
        held, self.held = self.held, None
        self.deliver = self.outbox.deliver
        for frame in held or ():
            self.deliver(frame)

    def expire_at(self, expires_at: float, leeway: float) -> None:
        """The token now expires at ``expires_at`` (unix seconds): move the deadline."""
        self.expires_at = expires_at
        if self.expiry is not None:
            self.expiry.deadline = trio.current_time() + max(0.0, expires_at + leeway - time.time())

    def expired(self, leeway: float) -> bool:
        return self.expires_at + leeway <= time.time()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.user_id}>"
