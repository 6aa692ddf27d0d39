"""hello's read, shared by the connections that say hello at the same moment.

Every connect needs its user row (created on first sight) and its room summaries. Read
one by one, a reconnect storm costs a statement, a round trip and, for new users, a
commit per connection. :class:`HelloReads` gathers the hellos that queue while a read is
in flight into the next read (``reads.hellos``, one statement for all of them), with up
to ``in_flight`` reads at once; a lone hello is read at once, as before.
"""

from __future__ import annotations

import math
from typing import Any

import structlog
import trio

from chatd import errors
from chatd.store import reads
from chatd.store.pool import Pool
from chatd.store.queueing import offer, take_ready

log = structlog.get_logger("chatd.service")

Summaries = tuple[bool, list[dict[str, Any]]]  # (disabled, room summaries)


class _Waiter:
    __slots__ = ("user_id", "done", "result", "error")

    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.done = trio.Event()
        self.result: Summaries | None = None
        self.error: errors.ChatdError | None = None


class HelloReads:
    """Start :meth:`serve` in a nursery; then :meth:`read` from any task."""

    def __init__(self, pool: Pool, *, max_batch: int = 256, in_flight: int = 2, queue_size: int = 20000) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.in_flight = in_flight
        self._send, self._receive = trio.open_memory_channel[_Waiter](queue_size)
        self.statements = 0  # reads run
        self.answered = 0  # hellos answered by them

    async def read(self, user_id: str) -> Summaries:
        """(disabled, room summaries) of ``user_id``; the user row exists afterwards.

        Raises what the read raised (errors.Unavailable, errors.Timeout, ...), and
        errors.Unavailable when too many hellos are waiting or the service is stopping.
        """
        waiter = _Waiter(user_id)
        offer(self._send, waiter, busy="server busy: too many connections saying hello", retry_after=1.0)
        await waiter.done.wait()
        if waiter.result is None:
            raise _again(waiter.error or errors.Unavailable("server is shutting down", retry_after=1.0))
        return waiter.result

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        slots = trio.Semaphore(self.in_flight)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    first = await self._receive.receive()
                    await slots.acquire()  # what queues meanwhile joins this read
                    nursery.start_soon(self._read, take_ready(self._receive, [first], self.max_batch), slots)
        finally:  # stopping: whoever still waits is told so, later reads fail at once
            for waiter in take_ready(self._receive, [], math.inf):
                waiter.done.set()
            self._receive.close()

    async def _read(self, batch: list[_Waiter], slots: trio.Semaphore) -> None:
        try:
            found = await reads.hellos(self.pool, sorted({w.user_id for w in batch}))
            given: set[str] = set()
            for waiter in batch:
                disabled, rooms = found[waiter.user_id]
                if waiter.user_id in given:  # the same user twice: rows of its own
                    rooms = [dict(row) for row in rooms]
                given.add(waiter.user_id)
                waiter.result = (disabled, rooms)
            self.statements += 1
            self.answered += len(batch)
        except errors.ChatdError as exc:
            for waiter in batch:
                waiter.result, waiter.error = None, exc
        except Exception:  # a bug: answer every waiter, keep serving
            log.exception("hello.read_crashed", size=len(batch))
            for waiter in batch:
                waiter.result, waiter.error = None, errors.Internal("internal error")
        finally:  # also when cancelled: nobody is left waiting
            slots.release()
            for waiter in batch:
                waiter.done.set()


def _again(error: errors.ChatdError) -> errors.ChatdError:
    """A fresh copy for each waiter, so no two tasks raise (and chain onto) one object."""
    try:
        return type(error)(error.message, **error.details)
    except TypeError:
        return error
