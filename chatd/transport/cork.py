"""Held writes: frames delivered inside ``corked()`` leave at its end, one send per connection.

The writer publishes a batch and answers it inside one block, so a sender's own event
and its ack cost one syscall instead of two. ``WebSocketConnection.deliver`` looks at
``current``: while a block is open, a connection with nothing pending hands its frame
to :meth:`Cork.hold` instead of the socket; a connection with a backlog appends to it
as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class _Deliverer(Protocol):
    def deliver(self, frame: bytes) -> bool: ...


class Cork:
    """The frames held inside one ``corked()`` block, per connection in first-held order."""

    __slots__ = ("held", "refused")

    def __init__(self) -> None:
        self.held: dict[_Deliverer, list[bytes]] = {}
        self.refused = 0  # held bundles a connection refused when they were sent

    def hold(self, conn: _Deliverer, frame: bytes) -> None:
        frames = self.held.get(conn)
        if frames is None:
            self.held[conn] = [frame]
        else:
            frames.append(frame)


current: Cork | None = None


@contextmanager
def corked() -> Iterator[Cork]:
    """Hold every frame delivered inside the block; at its end each connection sends
    its frames with one ``send``.

    The block must not await: nothing else runs while frames are held. Nested blocks
    join the outer one, which sends and counts.
    """
    global current
    if current is not None:
        yield Cork()
        return
    cork = current = Cork()
    try:
        yield cork
    finally:
        current = None
        for conn, frames in cork.held.items():
            if conn.deliver(frames[0] if len(frames) == 1 else b"".join(frames)) is False:
                cork.refused += 1
