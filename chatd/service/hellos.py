"""hello's read, shared by the connections that say hello at the same moment.

Every connect needs its user row (created on first sight) and its room summaries. Read
one by one, a reconnect storm costs a statement, a round trip and, for new users, a
commit per connection. :class:`HelloReads` gathers the hellos that queue while a read is
in flight into the next read (``reads.hellos``, one statement for all of them); see
chatd/service/shared.py.
"""

from __future__ import annotations

from typing import Any, Sequence

from chatd.service.shared import SharedReads
from chatd.store import reads
from chatd.store.pool import Pool

Summaries = tuple[bool, list[dict[str, Any]]]  # (disabled, room summaries)


class HelloReads(SharedReads[str, Summaries]):
    """Start :meth:`serve` in a nursery; then ``read(user_id)`` -> (disabled, room summaries),
    the user row existing afterwards."""

    def __init__(self, pool: Pool, *, max_batch: int = 256, in_flight: int = 2, queue_size: int = 20000) -> None:
        self.pool = pool
        super().__init__(self._hellos, what="hellos", max_batch=max_batch, in_flight=in_flight, queue_size=queue_size)

    async def _hellos(self, user_ids: Sequence[str]) -> list[Summaries]:
        found = await reads.hellos(self.pool, sorted(set(user_ids)))
        given: set[str] = set()
        out = []
        for user_id in user_ids:
            disabled, rooms = found[user_id]
            if user_id in given:  # the same user twice: rows of its own
                rooms = [dict(row) for row in rooms]
            given.add(user_id)
            out.append((disabled, rooms))
        return out
