"""Background upkeep of the database on a timer: the search index's pending list.

New messages enter the search index's pending list, which PostgreSQL otherwise merges
into the index inside whichever insert finds the list full: one send batch, and every
ack queued behind it, waits 200-300 ms (docs/decisions.md, "The search index merged in
the background"). :class:`SearchIndexMerges` does that merge every ``interval`` seconds
on a pooled connection, so the merge's cost stays off the writer's statements.
"""

from __future__ import annotations

import structlog
import trio

from chatd import errors
from chatd.store.maintenance import merge_search_pending
from chatd.store.pool import Pool

log = structlog.get_logger("chatd.service")


class SearchIndexMerges:
    """Start :meth:`serve` in a nursery; it merges until cancelled."""

    def __init__(self, pool: Pool, *, interval: float) -> None:
        self.pool = pool
        self.interval = interval
        self.merges = 0  # successful merges, including those that found nothing pending
        self.pages = 0  # pending pages they merged
        self.failures = 0

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failing = False
        while True:
            await trio.sleep(self.interval)
            try:
                pages = await merge_search_pending(self.pool)
            except errors.ChatdError as exc:
                self.failures += 1
                if not failing:  # once per run of failures, not once per interval
                    log.warning("search.merge_failed", code=exc.code, reason=exc.message, retry_every=self.interval,
                                consequence="until a merge succeeds, the insert that finds the pending list over 8 MB merges it")
                failing = True
                continue
            if failing:
                log.info("search.merge_recovered", failures=self.failures)
            failing = False
            self.merges += 1
            self.pages += pages
