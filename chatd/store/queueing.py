"""The two ends of a batching queue (the writer's mutations, hello's reads).

A caller offers an item without waiting; a serving task takes the first item, waits
until it may run a batch, then takes everything that queued meanwhile.
"""

from __future__ import annotations

from typing import TypeVar

import trio

from chatd import errors

T = TypeVar("T")


def offer(send: trio.MemorySendChannel[T], item: T, *, busy: str, retry_after: float) -> None:
    """Queue ``item`` without waiting; errors.Unavailable when the queue is full or closed."""
    try:
        send.send_nowait(item)
    except trio.WouldBlock:
        raise errors.Unavailable(busy, retry_after=retry_after) from None
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise errors.Unavailable("server is shutting down", retry_after=1.0) from None


def take_ready(receive: trio.MemoryReceiveChannel[T], batch: list[T], limit: float) -> list[T]:
    """Append to ``batch`` what is queued now, up to ``limit`` items in all; returns it."""
    while len(batch) < limit:
        try:
            batch.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    return batch
