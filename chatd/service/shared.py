"""Reads shared by the requests that arrive together: one statement for a whole batch.

A storm of connections doing the same read at the same moment (hellos after a restart,
syncs after a network blip) would otherwise be a statement, a round trip and a pooled
connection each, queued ten deep on the pool. :class:`SharedReads` gathers the requests
that queue while a read is in flight into the next read, with up to ``in_flight`` reads
at once; a lone request is read at once.
"""

from __future__ import annotations

import math
from typing import Awaitable, Callable, Generic, Sequence, TypeVar

import structlog
import trio

from chatd import errors
from chatd.store.queueing import offer, take_ready

log = structlog.get_logger("chatd.service")

Request = TypeVar("Request")
Result = TypeVar("Result")


class _Waiter(Generic[Request, Result]):
    __slots__ = ("request", "done", "result", "error")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.done = trio.Event()
        self.result: Result | None = None
        self.error: errors.ChatdError | None = None


class SharedReads(Generic[Request, Result]):
    """Start :meth:`serve` in a nursery; then :meth:`read` from any task.

    ``read_many`` answers a batch of requests with one result per request, in order. A
    batch holds at most ``max_batch`` requests and, when ``weight`` is given, requests of
    at most ``max_weight`` in all unless it is one request alone: a request that does not
    fit starts the next batch, so one huge request does not hold up many small ones.
    """

    def __init__(
        self, read_many: Callable[[Sequence[Request]], Awaitable[Sequence[Result]]], *, what: str,
        max_batch: int = 256, in_flight: int = 2, queue_size: int = 20000,
        weight: Callable[[Request], int] | None = None, max_weight: int = 0,
    ) -> None:
        self.read_many = read_many
        self.what = what
        self.max_batch = max_batch
        self.in_flight = in_flight
        self.weight = weight or _one  # without weights only max_batch bounds a batch
        self.max_weight = max_weight if weight else math.inf
        self._send, self._receive = trio.open_memory_channel[_Waiter](queue_size)
        self._next: _Waiter[Request, Result] | None = None  # taken, did not fit the last batch
        self.statements = 0  # reads run
        self.answered = 0  # requests answered by them

    async def read(self, request: Request) -> Result:
        """The result for ``request``.

        Raises what the read raised (errors.Unavailable, errors.Timeout, ...), and
        errors.Unavailable when too many requests are waiting or the service is stopping.
        """
        waiter: _Waiter[Request, Result] = _Waiter(request)
        offer(self._send, waiter, busy=f"server busy: too many {self.what} waiting", retry_after=1.0)
        await waiter.done.wait()
        if waiter.error is not None or waiter.result is None:
            raise _again(waiter.error or errors.Unavailable("server is shutting down", retry_after=1.0))
        return waiter.result

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        slots = trio.Semaphore(self.in_flight)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    first, self._next = self._next or await self._receive.receive(), None
                    await slots.acquire()  # what queues meanwhile joins this read
                    nursery.start_soon(self._read, self._batch(first), slots)
        finally:  # stopping: whoever still waits is told so, later reads fail at once
            for waiter in take_ready(self._receive, [self._next] if self._next else [], math.inf):
                waiter.done.set()
            self._next = None
            self._receive.close()

    def _batch(self, first: _Waiter[Request, Result]) -> list[_Waiter[Request, Result]]:
        batch, total = [first], self.weight(first.request)
        while len(batch) < self.max_batch:
            try:
                waiter = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            weight = self.weight(waiter.request)
            if total + weight > self.max_weight:
                self._next = waiter
                break
            batch.append(waiter)
            total += weight
        return batch

    async def _read(self, batch: list[_Waiter[Request, Result]], slots: trio.Semaphore) -> None:
        try:
            results = await self.read_many([w.request for w in batch])
            for waiter, result in zip(batch, results, strict=True):
                waiter.result = result
            self.statements += 1
            self.answered += len(batch)
        except errors.ChatdError as exc:
            for waiter in batch:
                waiter.result, waiter.error = None, exc
        except Exception:  # a bug: answer every waiter, keep serving
            log.exception("shared_read.crashed", what=self.what, size=len(batch))
            for waiter in batch:
                waiter.result, waiter.error = None, errors.Internal("internal error")
        finally:  # also when cancelled: nobody is left waiting
            slots.release()
            for waiter in batch:
                waiter.done.set()


def _one(_request: object) -> int:
    return 1


def _again(error: errors.ChatdError) -> errors.ChatdError:
    """A fresh copy for each waiter, so no two tasks raise (and chain onto) one object."""
    try:
        return type(error)(error.message, **error.details)
    except TypeError:
        return error

