"""Database upkeep that chatd does itself, off the path of any client's command."""

from __future__ import annotations

from chatd.store.pool import Pool

SEARCH_INDEX = "events_search"


async def merge_search_pending(pool: Pool) -> int:
    """Move the search index's pending entries into the index; returns pending pages merged.

    Inserts keep appending to the pending list meanwhile (PostgreSQL takes the pending
    list's own lock only around its metapage updates), and an insert that finds a merge
    under way does not wait for it.
    """
    row = await pool.fetchone("SELECT gin_clean_pending_list(%s::regclass) AS pages", (SEARCH_INDEX,))
    return row["pages"]
