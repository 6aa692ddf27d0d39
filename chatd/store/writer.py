"""The group-commit writer: every durable mutation goes through here.

Mutations from all connections are queued on one channel. The writer drains up
to ``max_batch`` of them into ONE commit: a run of sends is one statement
(idempotency check, membership and reply checks, per-room seq allocation on
``rooms.last_seq`` under row locks taken in id order, the rows and their
idempotency records), which commits on its own, so a batch of sends costs one
round trip; a batch holding any other mutation is one transaction in which each
of those runs in its own savepoint so a rejected one harms none of the others.
After the commit the batch's events are published in seq order and every waiter
is answered. Nothing is answered or published that did not commit (DESIGN.md
§3.1, §3.2, §3.4).

Transactions run one after another: the next batch is gathered once the batch
before has ended its transaction, so it takes everything that queued meanwhile,
and each room's seqs stay gapless and in commit order. A batch's statement may
run while the batch before is still publishing (up to ``pipeline`` batches in
flight, each with its own connection); batches are published and answered
strictly in the order they were formed, so a room's events go out in seq order
and a connection's acks in the order it sent. When the next batch is already
waiting, a committed batch publishes only once that batch's statement has left
(at most :data:`PUBLISH_HOLD` later), so the database works while the loop
publishes instead of idling through it. While sends stream in faster than
batches commit, a batch may wait up to ``linger`` for the ones its arrival rate
promises, so that each round trip and commit carries more of them.

If the transaction fails for a reason that is not any single mutation's fault
(a concurrent process committed the same idempotency key, a serialization
failure) the whole batch is retried; if the database is unreachable every
waiter gets ``unavailable`` and may retry with the same client id.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Sequence

import structlog
import trio

from chatd import errors
from chatd.domain.model import RoomEvent
from chatd.store.mutations import Mutation, Send, Tx, send_batch
from chatd.store.pool import Pool
from chatd.store.queueing import offer, take_ready

log = structlog.get_logger("chatd.writer")

RETRIES = 3

Publish = Callable[[Sequence[RoomEvent]], None]
# Fan-out of a huge batch (a thousand-member room being created) is split into
# chunks of about this many events, whole rooms each, with a checkpoint between
# them so pings and other connections are served meanwhile.
PUBLISH_CHUNK = 256
# The longest a committed batch holds its publish for the next batch's statement to
# leave; that usually takes a few scheduler passes (docs/decisions.md, "The next
# statement leaves before the publish").
PUBLISH_HOLD = 0.005


class Writer:
    """Owns the mutation queue. Start :meth:`serve` in a nursery; use :meth:`submit`."""

    def __init__(
        self, pool: Pool, *, max_batch: int, queue_size: int, publish: Publish, pipeline: int = 1,
        linger: float = 0.0, hold: Callable[[], ContextManager[Any]] = nullcontext,
    ) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.pipeline = pipeline
        self.linger = linger
        self.lingered = 0  # batches that waited for more mutations
        self.publish = publish
        # Entered around each publish and the answers that follow it; the service
        # holds outgoing frames there so each connection gets them in one write.
        self.hold = hold
        self._send, self._receive = trio.open_memory_channel[Mutation](queue_size)
        self.batches = 0
        self.committed = 0
        self.in_flight = 0  # batches between their first statement and their answers
        self.max_in_flight = 0
        self._outstanding = 0  # submitted, not yet answered
        self._submitted = 0
        self._wake_at = 0  # while a batch lingers: the submission count that ends the wait
        self._filled = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._forming = False  # the next batch's first mutation is taken, its run not started
        self._next_left: trio.Event | None = None  # set once the next batch's statement has left

    def submit(self, mutation: Mutation) -> None:
        """Queue ``mutation``; its ``on_done`` is called after commit (or failure).

        Never blocks. Raises errors.Unavailable when the queue is full or closed.
        """
        offer(self._send, mutation, busy="server busy: too many pending writes", retry_after=0.5)
        self._outstanding += 1
        self._submitted += 1
        if self._submitted == self._wake_at:
            self._wake_at = 0
            self._filled.set()
        if self._idle.is_set():
            self._idle = trio.Event()

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
        slots = trio.Semaphore(self.pipeline)
        # Transactions run one after another: a batch is gathered only once the batch
        # before has ended its transaction (it could not lock its rooms earlier
        # anyway, and everything that queued meanwhile joins it), so seqs follow batch
        # order and no two transactions can deadlock. Publishing and answering are
        # relayed from batch to batch, so events and acks keep batch order too; up to
        # ``pipeline`` batches are in flight, one in its transaction, others publishing.
        ended, answered = trio.Event(), trio.Event()
        ended.set()
        answered.set()
        pace = _Pace()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    first = await receive.receive()
                except trio.EndOfChannel:
                    break
                self._forming = True
                await slots.acquire()
                await ended.wait()
                if self.linger:
                    await self._linger(pace, receive)
                batch = take_ready(receive, [first], self.max_batch)
                self._forming = False
                left, self._next_left = self._next_left, None
                before_answered, ended, answered = answered, trio.Event(), trio.Event()
                nursery.start_soon(self._run, batch, before_answered, ended, answered, slots, left)
            await answered.wait()

    async def _linger(self, pace: _Pace, receive: trio.MemoryReceiveChannel[Mutation]) -> None:
        """Wait up to ``linger`` for as many mutations as the arrival rate promises."""
        want = min(pace.expected(self._submitted, self.linger), self.max_batch)
        queued = receive.statistics().current_buffer_used + 1  # the batch's first is taken already
        if want <= queued:
            return
        self.lingered += 1
        if self._next_left is not None:  # the database idles meanwhile anyway: publish now
            self._next_left.set()
        self._wake_at, self._filled = self._submitted + want - queued, trio.Event()
        with trio.move_on_after(self.linger):
            await self._filled.wait()
        self._wake_at = 0

    async def _run(
        self, batch: list[Mutation], before_answered: trio.Event, ended: trio.Event, answered: trio.Event,
        slots: trio.Semaphore, left: trio.Event | None,
    ) -> None:
        """Commit, publish and answer ``batch``; ``left`` is set once its statement has left."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._commit(batch, before_answered, ended, left)
        finally:
            self.in_flight -= 1
            ended.set()
            answered.set()
            slots.release()

    async def _commit(self, batch: list[Mutation], before_answered: trio.Event, ended: trio.Event, left: trio.Event | None) -> None:
        """Commit ``batch``, then, once the batch before has answered, publish and answer."""
        for attempt in range(1, RETRIES + 1):
            try:
                events, outcomes = await self._transaction(batch, left)
            except errors.ChatdError as exc:
                if isinstance(exc, errors.Contention) and attempt < RETRIES:
                    log.info("writer.retry", attempt=attempt, reason=exc.message)
                    continue
                log.warning("writer.batch_failed", size=len(batch), code=exc.code, reason=exc.message)
                failure = exc if isinstance(exc, errors.Unavailable) else errors.Unavailable(
                    "write failed, retry with the same client id", retry_after=0.2
                )
                events, outcomes = [], [(None, failure)] * len(batch)
            except Exception:  # a bug in a mutation: answer, log, keep the writer alive
                log.exception("writer.batch_crashed", size=len(batch))
                failure = errors.Internal("internal error: nothing was written; retry with the same client id")
                events, outcomes = [], [(None, failure)] * len(batch)
            else:
                self.batches += 1
                self.committed += len(batch)
                events.sort(key=_event_order)
            if left is not None:  # also when it failed before its statement left (cancelled: the hold times out)
                left.set()
            next_left = None
            if self.pipeline > 1 and (self._forming or self._receive.statistics().current_buffer_used):
                next_left = self._next_left = trio.Event()  # the next batch starts once we end
            ended.set()
            # Committed (or failed): wait for our turn, fan out and answer even if
            # we are being cancelled (no I/O waits in here, only checkpoints).
            with trio.CancelScope(shield=True):
                await before_answered.wait()
                if next_left is not None:
                    with trio.move_on_after(PUBLISH_HOLD):
                        await next_left.wait()
                chunks = _chunks(events)
                for chunk in chunks[:-1]:  # a huge batch: let others run between chunks
                    with self.hold():
                        self._publish(chunk)
                    await trio.lowlevel.checkpoint()
                with self.hold():  # the last events and the answers leave together
                    if chunks:
                        self._publish(chunks[-1])
                    for mutation, (result, error) in zip(batch, outcomes):
                        _finish(mutation, result, error)
                self._outstanding -= len(batch)
                if self._outstanding == 0:
                    self._idle.set()
            return

    def _publish(self, events: list[RoomEvent]) -> None:
        try:
            self.publish(events)
        except Exception:  # noqa: BLE001 - fan-out bugs must not lose acks
            log.exception("writer.publish_failed")

    async def _transaction(self, batch: list[Mutation], left: trio.Event | None) -> tuple[list[RoomEvent], list[tuple[Any, Any]]]:
        outcomes: list[tuple[Any, Any]] = [(None, None)] * len(batch)
        events: list[RoomEvent] = []
        # A batch of sends is one statement, which commits by itself; anything else
        # is one transaction of savepoints.
        only_sends = all(type(m) is Send for m in batch)
        async with self.pool.connection() if only_sends else self.pool.transaction() as conn:
            # ``left`` tells the batch before that this one's first statement is on the
            # wire (a transaction's BEGIN is already).
            on_sent = left.set if left is not None and only_sends else None
            if left is not None and not only_sends:
                left.set()
            tx = Tx(conn)
            i = 0
            while i < len(batch):
                if isinstance(batch[i], Send):
                    j = i
                    while j < len(batch) and isinstance(batch[j], Send):
                        j += 1
                    for k, outcome in enumerate(await send_batch(tx, batch[i:j], on_sent=on_sent), start=i):
                        outcomes[k] = outcome
                    i = j
                    continue
                outcomes[i] = await tx.apply_one(batch[i])
                i += 1
            events.extend(tx.events)
        return events, outcomes


class _Pace:
    """How many mutations a batch about to start can expect within ``linger``.

    Each batch costs a round trip and a commit whatever its size, so under a steady
    stream of sends (thousands of conversations each sending now and then) slightly
    fuller batches save most of the writer's and the database's work per message.
    The arrival rate is measured from one batch's start to the next. A batch waits
    only while more mutations are expected within ``linger`` than are queued, and
    only until they have arrived: a lone send on a quiet server, or a backlog at
    least that large (what queued during a slow commit), starts at once.
    """

    __slots__ = ("count", "time")

    def __init__(self) -> None:
        self.count = 0
        self.time = trio.current_time()

    def expected(self, submitted: int, linger: float) -> int:
        now = trio.current_time()
        arrived, elapsed = submitted - self.count, now - self.time
        self.count, self.time = submitted, now
        return int(arrived / elapsed * linger) if elapsed > 0 else 0


def _finish(mutation: Mutation, result: Any, error: errors.ChatdError | None) -> None:
    try:
        mutation.finish(result, error)
    except Exception:  # noqa: BLE001 - one waiter's callback must not cost the others their answer
        log.exception("writer.answer_failed", command=mutation.command)


def _chunks(events: list[RoomEvent]) -> list[list[RoomEvent]]:
    """``events`` cut into runs of about PUBLISH_CHUNK, a room's events never split."""
    chunks = []
    start = 0
    while start < len(events):
        end = min(start + PUBLISH_CHUNK, len(events))
        while end < len(events) and events[end].room_id == events[end - 1].room_id:
            end += 1  # a room's events stay together: one run per recipient
        chunks.append(events[start:end])
        start = end
    return chunks


def _event_order(event: RoomEvent) -> tuple[int, int]:
    return (event.room_id, event.seq)

