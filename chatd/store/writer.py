"""The group-commit writer: every durable mutation goes through here.

Mutations from all connections are queued on one channel. The writer drains up
to ``max_batch`` of them into ONE transaction: runs of consecutive sends become a
handful of multi-row statements (idempotency check, membership check, per-room
seq allocation on ``rooms.last_seq`` under row locks taken in id order, one
multi-row INSERT), every other mutation runs in its own savepoint so a rejected
one harms none of the others. After COMMIT the batch's events are published in
seq order and every waiter is answered. Nothing is answered or published that
did not commit (DESIGN.md §3.1, §3.2, §3.4).

If the transaction fails for a reason that is not any single mutation's fault
(a concurrent process committed the same idempotency key, a serialization
failure) the whole batch is retried; if the database is unreachable every
waiter gets ``unavailable`` and may retry with the same client id.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import structlog
import trio

from chatd import errors
from chatd.domain.model import RoomEvent
from chatd.store.mutations import Mutation, Send, Tx, send_batch
from chatd.store.pool import Pool

log = structlog.get_logger("chatd.writer")

RETRIES = 3

Publish = Callable[[Sequence[RoomEvent]], None]
# Fan-out of a huge batch (a thousand-member room being created) is split into
# chunks of about this many events, whole rooms each, with a checkpoint between
# them so pings and other connections are served meanwhile.
PUBLISH_CHUNK = 256


class Writer:
    """Owns the mutation queue. Start :meth:`serve` in a nursery; use :meth:`submit`."""

    def __init__(self, pool: Pool, *, max_batch: int, queue_size: int, publish: Publish) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.publish = publish
        self._send, self._receive = trio.open_memory_channel[Mutation](queue_size)
        self.batches = 0
        self.committed = 0
        self._idle = trio.Event()
        self._idle.set()

    def submit(self, mutation: Mutation) -> None:
        """Queue ``mutation``; its ``on_done`` is called after commit (or failure).

        Never blocks. Raises errors.Unavailable when the queue is full or closed.
        """
        try:
            self._send.send_nowait(mutation)
        except trio.WouldBlock:
            raise errors.Unavailable("server busy: too many pending writes", retry_after=0.5) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise errors.Unavailable("server is shutting down", retry_after=1.0) from None
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    async def run(self, mutation: Mutation) -> Any:
        """Submit and wait for the result (HTTP API, tests). Raises the mutation's error."""
        done = trio.Event()
        outcome: list[Any] = []

        def finished(result: Any, error: errors.ChatdError | None) -> None:
            outcome.append((result, error))
            done.set()

        mutation.on_done = finished
        self.submit(mutation)
        await done.wait()
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    async def drain(self) -> None:
        """Stop accepting and wait until everything queued has been committed."""
        self._send.close()
        await self._idle.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        receive = self._receive
        while True:
            try:
                first = await receive.receive()
            except trio.EndOfChannel:
                self._idle.set()
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await self._commit(batch)
            if receive.statistics().current_buffer_used == 0:
                self._idle.set()

    async def _commit(self, batch: list[Mutation]) -> None:
        for attempt in range(1, RETRIES + 1):
            try:
                events, outcomes = await self._transaction(batch)
            except errors.ChatdError as exc:
                if isinstance(exc, errors.Contention) and attempt < RETRIES:
                    log.info("writer.retry", attempt=attempt, reason=exc.message)
                    continue
                log.warning("writer.batch_failed", size=len(batch), code=exc.code, reason=exc.message)
                failure = exc if isinstance(exc, errors.Unavailable) else errors.Unavailable(
                    "write failed, retry with the same client id", retry_after=0.2
                )
                self._fail(batch, failure)
                return
            except Exception:  # a bug in a mutation: answer, log, keep the writer alive
                log.exception("writer.batch_crashed", size=len(batch))
                self._fail(batch, errors.Internal("internal error: nothing was written; retry with the same client id"))
                return
            self.batches += 1
            self.committed += len(batch)
            events.sort(key=_event_order)
            # Committed: fan out and answer even if we are being cancelled (no I/O
            # waits in here, only checkpoints between chunks).
            with trio.CancelScope(shield=True):
                try:
                    await self._publish(events)
                except Exception:  # noqa: BLE001 - fan-out bugs must not lose acks
                    log.exception("writer.publish_failed")
                for mutation, (result, error) in zip(batch, outcomes):
                    _finish(mutation, result, error)
            return

    async def _publish(self, events: list[RoomEvent]) -> None:
        start = 0
        while start < len(events):
            end = min(start + PUBLISH_CHUNK, len(events))
            while end < len(events) and events[end].room_id == events[end - 1].room_id:
                end += 1  # a room's events stay together: one run per recipient
            self.publish(events[start:end])
            start = end
            if start < len(events):
                await trio.lowlevel.checkpoint()

    def _fail(self, batch: list[Mutation], error: errors.ChatdError) -> None:
        for mutation in batch:
            _finish(mutation, None, error)

    async def _transaction(self, batch: list[Mutation]) -> tuple[list[RoomEvent], list[tuple[Any, Any]]]:
        outcomes: list[tuple[Any, Any]] = [(None, None)] * len(batch)
        events: list[RoomEvent] = []
        async with self.pool.transaction() as conn:
            tx = Tx(conn)
            i = 0
            while i < len(batch):
                if isinstance(batch[i], Send):
                    j = i
                    while j < len(batch) and isinstance(batch[j], Send):
                        j += 1
                    for k, outcome in enumerate(await send_batch(tx, batch[i:j]), start=i):
                        outcomes[k] = outcome
                    i = j
                    continue
                outcomes[i] = await tx.apply_one(batch[i])
                i += 1
            events.extend(tx.events)
        return events, outcomes


def _finish(mutation: Mutation, result: Any, error: errors.ChatdError | None) -> None:
    try:
        mutation.finish(result, error)
    except Exception:  # noqa: BLE001 - one waiter's callback must not cost the others their answer
        log.exception("writer.answer_failed", command=mutation.command)


def _event_order(event: RoomEvent) -> tuple[int, int]:
    return (event.room_id, event.seq)

