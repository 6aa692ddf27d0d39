"""Read readiness of every WebSocket from one edge-triggered epoll of our own.

trio's ``wait_readable`` registers a socket with ``EPOLLONESHOT`` and so re-arms it
with an ``epoll_ctl`` on every wait, and each wait builds a chain of coroutines and
a closure that live until the read. A chat server reads one small frame per wait,
thousands of times a second: that ``epoll_ctl`` alone was ~7 % of chatd's samples
at the ``durable`` ceiling, and the per-wait objects are most of what the young GC
passes walk (docs/decisions.md, "Read readiness from one epoll").

Here each connection's socket is registered once, edge-triggered, in the hub's
own epoll; that epoll's descriptor is the only thing the hub task waits on through
trio. On a wake-up the hub marks every reported connection readable and
reschedules the ones parked in ``WebSocketConnection.receive``. The reader then
reads; a read shorter than the buffer means the socket was drained, so the next
arrival raises a new edge. A connection calls :meth:`ReadHub.unwatch` before it
closes its socket, so a reused descriptor number never reaches the wrong one.
"""

from __future__ import annotations

import select
from typing import Protocol

import trio

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
MAX_EVENTS = 1024  # per epoll_wait; more are taken by the next call in the same wake-up


class Readable(Protocol):
    """What the hub needs of a connection: ``read_ready()`` marks it readable and wakes
    a reader parked on it."""

    def read_ready(self) -> None: ...


class ReadHub:
    """Start :meth:`run` in a nursery that outlives every watched connection."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, Readable] = {}

    @property
    def watching(self) -> int:
        return len(self._watched)

    def watch(self, fd: int, conn: Readable) -> None:
        """Report readiness of ``fd`` to ``conn.read_ready()`` until :meth:`unwatch`.

        Readiness that exists already is reported too (epoll checks on registration).
        Raises OSError for a closed descriptor. (epoll keys a registration by the open
        socket, not only its number, and drops it when the socket closes: a new socket
        given a number that was never unwatched registers afresh.)
        """
        self._epoll.register(fd, _EVENTS)
        self._watched[fd] = conn

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it. Never raises."""
        if self._watched.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it from the epoll

    async def run(self) -> None:
        """Dispatch readiness until cancelled; closes the epoll on the way out."""
        epoll, watched = self._epoll, self._watched
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                while True:
                    events = epoll.poll(0, MAX_EVENTS)
                    for fd, _mask in events:
                        conn = watched.get(fd)
                        if conn is not None:
                            conn.read_ready()
                    if len(events) < MAX_EVENTS:
                        break
        finally:
            trio.lowlevel.notify_closing(epoll)
            epoll.close()
