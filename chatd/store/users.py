"""Writes to user rows that are not room mutations (they skip the group-commit writer).

Only ``last_seen`` so far: presence data, written behind disconnects by
chatd/service/lastseen.py.
"""

from __future__ import annotations

from chatd.store.pool import Pool

# Rows are updated in id order, and a stored moment is only ever moved forward (another
# process may have written a later one).
_LAST_SEEN_SQL = """
    UPDATE users AS u SET last_seen = to_timestamp(v.seen)
    FROM (SELECT id, seen FROM unnest(%(ids)s::text[], %(seen)s::float8[]) AS x(id, seen) ORDER BY id) AS v
    WHERE u.id = v.id AND (u.last_seen IS NULL OR u.last_seen < to_timestamp(v.seen))
"""


async def write_last_seen(pool: Pool, moments: dict[str, float]) -> None:
    """Store each user's last-seen moment (epoch seconds); unknown users are skipped."""
    ids = sorted(moments)
    await pool.execute(_LAST_SEEN_SQL, {"ids": ids, "seen": [moments[i] for i in ids]})
