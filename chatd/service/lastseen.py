"""Users' ``last_seen``, written behind their last disconnect, many users per statement.

A session that closes used to wait for its own ``UPDATE users SET last_seen`` through
the read pool. When thousands of clients drop at once (a network blip, a restarted
proxy) that was thousands of tasks queued on ten pooled connections: writes timed out
and were lost, and the waiting tasks kept their frames and scopes alive long enough for
the collector to walk them again and again (pauses of 100-400 ms; docs/decisions.md,
"last_seen written behind").

Now closing a session only records ``(user, moment)``; :class:`LastSeenWrites` writes
what was recorded meanwhile in one statement of up to ``max_batch`` users, the newest
moment per user. A failed write is logged and retried after ``retry_after`` seconds; the
moment kept is never older than one already stored (another process may have written a
newer one). What is still pending when the service stops is written once more, within
``timeout``. The live value clients see comes from the in-process presence registry;
the column serves users no process has in memory.
"""

from __future__ import annotations

import structlog
import trio

from chatd import errors
from chatd.store import users
from chatd.store.pool import Pool

log = structlog.get_logger("chatd.service")


class LastSeenWrites:
    """Start :meth:`serve` in a nursery; then :meth:`record` from anywhere (never blocks)."""

    def __init__(self, pool: Pool, *, timeout: float, max_batch: int = 1000, retry_after: float = 1.0) -> None:
        self.pool = pool
        self.timeout = timeout
        self.max_batch = max_batch
        self.retry_after = retry_after
        self._pending: dict[str, float] = {}
        self._wake = trio.Event()
        self.statements = 0  # successful writes
        self.written = 0  # users written by them
        self.failures = 0  # failed writes (their users are retried)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def record(self, user_id: str, moment: float) -> None:
        """``user_id`` was last seen at ``moment`` (epoch seconds); the latest moment wins."""
        if moment > self._pending.get(user_id, 0.0):
            self._pending[user_id] = moment
        self._wake.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    if not await self._write_some():
                        await trio.sleep(self.retry_after)
        finally:  # stopping: what is left gets one more try
            with trio.CancelScope(shield=True):
                while self._pending and await self._write_some():
                    pass
            if self._pending:
                log.warning("presence.last_seen_lost", users=len(self._pending))

    async def _write_some(self) -> bool:
        """Write up to ``max_batch`` pending users; False (they stay pending) if it failed."""
        batch = {}
        for user_id in list(self._pending)[: self.max_batch]:
            batch[user_id] = self._pending.pop(user_id)
        try:
            with trio.fail_after(self.timeout):
                await users.write_last_seen(self.pool, batch)
        except (errors.ChatdError, trio.TooSlowError) as exc:
            self.failures += 1
            message = getattr(exc, "message", None) or f"no answer within {self.timeout}s"
            log.warning("presence.last_seen_failed", users=len(batch), error=message, retry_in=self.retry_after)
            self._put_back(batch)
            return False
        except BaseException:  # cancelled mid-write (the service stopping): the final flush retries them
            self._put_back(batch)
            raise
        self.statements += 1
        self.written += len(batch)
        return True

    def _put_back(self, batch: dict[str, float]) -> None:
        for user_id, moment in batch.items():  # a newer moment recorded meanwhile wins
            if moment > self._pending.get(user_id, 0.0):
                self._pending[user_id] = moment
