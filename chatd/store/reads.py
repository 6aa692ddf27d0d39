"""Read queries: room summaries, history pages, sync pages, snapshots.

A member sees the events of a room from the seq of their (latest) join onward;
a user who left or was removed sees nothing of the room any more. History and
sync return a message event in its CURRENT state: edited body, ``deleted``
tombstone without content, and its reactions.
"""

from __future__ import annotations

import json
from typing import Any

from chatd import errors
from chatd.domain.model import RoomEvent
from chatd.store.pool import Pool

UNREAD_CAP = 10000

# RoomInfo (docs/protocol.md §5.2) of room %(room)s as %(viewer)s sees it.
ROOM_INFO_SQL = (
    "SELECT r.id AS room_id, r.kind, r.title, r.public, r.created_by,"
    " extract(epoch FROM r.created_at)::float8 AS created_at, r.last_seq,"
    " (SELECT count(*) FROM members m WHERE m.room_id = r.id AND m.left_seq IS NULL) AS member_count,"
    " (SELECT o.user_id FROM members o WHERE r.kind = 'dm' AND o.room_id = r.id AND o.user_id <> %(viewer)s LIMIT 1) AS peer"
    " FROM rooms r WHERE r.id = %(room)s"
)


def room_info_from(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("peer") is None:
        row.pop("peer", None)
    return row


# An event row of ``events ev`` with its reactions if it is a live message: emoji in the
# order first used, each with its users in the order they reacted (json keeps the order).
_EVENT_COLUMNS = """ev.room_id, ev.seq, ev.kind, ev.sender, extract(epoch FROM ev.created_at)::float8 AS at,
    ev.data, ev.body, ev.edited, ev.deleted,
    (SELECT json_object_agg(x.emoji, x.users ORDER BY x.first) FROM (
         SELECT emoji, array_agg(user_id ORDER BY created_at) AS users, min(created_at) AS first
         FROM reactions r WHERE r.room_id = ev.room_id AND r.seq = ev.seq GROUP BY emoji) x
     WHERE ev.kind = 'message' AND NOT ev.deleted) AS reactions"""


# The caller's current rooms with last seq, read watermark and unread count
# (RoomSummary, docs/protocol.md §5.2); {only} narrows it to %(ids)s, and rooms for which
# {uncounted} holds get a NULL unread (counting reads up to UNREAD_CAP index entries).
_SUMMARIES_SQL = f"""
    SELECT r.id AS room_id, r.kind, r.title, r.public, m.role, r.last_seq, m.read_seq, m.joined_seq,
           CASE WHEN {{uncounted}} THEN NULL ELSE (SELECT count(*) FROM (SELECT 1 FROM events e
               WHERE e.room_id = r.id AND e.seq > m.read_seq AND e.kind = 'message'
                 AND e.sender <> m.user_id LIMIT {UNREAD_CAP}) u) END AS unread,  -- deleted ones count (docs §5.2)
           (SELECT o.user_id FROM members o WHERE r.kind = 'dm' AND o.room_id = r.id AND o.user_id <> m.user_id) AS peer
    FROM members m JOIN rooms r ON r.id = m.room_id
    WHERE m.user_id = %(user)s AND m.left_seq IS NULL {{only}}
    ORDER BY r.id
"""

# Everything hello needs, for every connection saying hello at once, in one round trip:
# the user rows are created on first sight (the token issuer is the authority on users;
# DO NOTHING writes nothing for a known user, so a known user's connect is no commit),
# then one row per user and current room, or a single row with a NULL room_id for a user
# in no room. Ids are inserted in sorted order, so two of these never deadlock.
_HELLOS_SQL = (
    "WITH u AS (SELECT DISTINCT id FROM unnest(%(users)s::text[]) AS u(id)),"
    " seen AS (INSERT INTO users (id) SELECT id FROM u ORDER BY id ON CONFLICT (id) DO NOTHING)"
    " SELECT u.id AS hello_user, coalesce((SELECT disabled FROM users WHERE users.id = u.id), false) AS disabled, s.*"
    " FROM u LEFT JOIN LATERAL (" + _SUMMARIES_SQL.format(only="", uncounted="false").replace("%(user)s", "u.id") + ") s ON true"
)


def _summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        if row["peer"] is None:
            del row["peer"]
    return rows


async def hellos(pool: Pool, user_ids: list[str]) -> dict[str, tuple[bool, list[dict[str, Any]]]]:
    """(disabled, room summaries) of each of ``user_ids``, creating user rows on first sight."""
    found: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
    for row in await pool.fetch(_HELLOS_SQL, {"users": user_ids}):
        user_id, disabled = row.pop("hello_user"), row.pop("disabled")
        rooms = found.setdefault(user_id, (disabled, []))[1]
        if row["room_id"] is not None:
            rooms.append(row)
    for _, rooms in found.values():
        _summary_rows(rooms)
    return found


async def room_summaries(pool: Pool, user_id: str, room_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The caller's current rooms with last seq, read watermark and unread count."""
    only = "AND r.id = ANY(%(ids)s)" if room_ids is not None else ""
    rows = await pool.fetch(_SUMMARIES_SQL.format(only=only, uncounted="false"), {"user": user_id, "ids": room_ids})
    return _summary_rows(rows)


# A room the caller listed in its sync: sync answers it with events, not a summary, so
# its unread count is not needed.
_LISTED = "EXISTS (SELECT 1 FROM w WHERE w.caller = c.caller AND w.room_id = r.id)"

# sync in one round trip, for every client that syncs at once: each caller's current
# rooms (RoomSummary columns), each listed room that is behind joined with the first page
# of events after the seq the client has (whether a room is too far behind for a page is
# the caller's rule). Per caller (``sync_caller``, its index in the batch), one row per
# summary without a page, one row per event otherwise (the summary repeated); a caller's
# page size is its limit plus one, to tell whether more follow.
_SYNC_SQL = f"""
    WITH c AS (SELECT * FROM unnest(%(callers)s::int[], %(users)s::text[], %(limits)s::int[]) AS c(caller, user_id, lim)),
    w AS (SELECT * FROM unnest(%(of)s::int[], %(rooms)s::bigint[], %(haves)s::bigint[]) AS w(caller, room_id, have))
    SELECT c.caller AS sync_caller, s.*, e.seq, e.kind AS event_kind, e.sender, e.at, e.data, e.body, e.edited, e.deleted, e.reactions
    FROM c CROSS JOIN LATERAL ({_SUMMARIES_SQL.format(only="", uncounted=_LISTED).replace("%(user)s", "c.user_id")}) s
    LEFT JOIN w ON w.caller = c.caller AND w.room_id = s.room_id
    LEFT JOIN LATERAL (
        SELECT {_EVENT_COLUMNS} FROM events ev
        WHERE w.have < s.last_seq AND ev.room_id = s.room_id AND ev.seq >= greatest(s.joined_seq, w.have + 1)
        ORDER BY ev.seq LIMIT c.lim
    ) e ON true
    ORDER BY c.caller, s.room_id, e.seq
"""
_SUMMARY_KEYS = ("room_id", "kind", "title", "public", "role", "last_seq", "read_seq", "joined_seq", "unread", "peer")

SyncPages = tuple[list[dict[str, Any]], dict[int, tuple[list[RoomEvent], bool]]]


async def sync_pages(pool: Pool, user_id: str, haves: dict[int, int], *, limit: int) -> SyncPages:
    """The caller's room summaries and, for each room of ``haves`` (room id -> the seq the
    client has) that is behind, its next page of at most ``limit`` events and whether
    more follow; all in one statement. A room of ``haves`` has no unread count (None)."""
    return (await sync_pages_many(pool, [(user_id, haves, limit)]))[0]


async def sync_pages_many(pool: Pool, requests: list[tuple[str, dict[int, int], int]]) -> list[SyncPages]:
    """:func:`sync_pages` for each (user_id, haves, limit) of ``requests``, in one statement."""
    of, rooms, haves = [], [], []
    for i, (_, have, _) in enumerate(requests):
        for room_id in sorted(have):
            of.append(i)
            rooms.append(room_id)
            haves.append(have[room_id])
    rows = await pool.fetch(_SYNC_SQL, {
        "callers": list(range(len(requests))), "users": [r[0] for r in requests], "limits": [r[2] + 1 for r in requests],
        "of": of, "rooms": rooms, "haves": haves})
    results: list[SyncPages] = [([], {}) for _ in requests]
    for row in rows:
        summaries, pages = results[row.pop("sync_caller")]
        room_id = row["room_id"]
        if not summaries or summaries[-1]["room_id"] != room_id:
            summaries.append({k: row[k] for k in _SUMMARY_KEYS})
        if row["seq"] is not None:
            row["kind"] = row["event_kind"]
            pages.setdefault(room_id, ([], False))[0].append(event_from_row(row))
    for (_, _, limit), (summaries, pages) in zip(requests, results):
        _summary_rows(summaries)
        for room_id, (events, _) in pages.items():
            pages[room_id] = (events[:limit], len(events) > limit)
    return results


async def room_mates(pool: Pool, user_id: str, candidates: list[str]) -> list[str]:
    """Those of ``candidates`` who share at least one room with ``user_id``."""
    rows = await pool.fetch(
        "SELECT DISTINCT o.user_id FROM members m JOIN members o ON o.room_id = m.room_id AND o.left_seq IS NULL"
        " WHERE m.user_id = %s AND m.left_seq IS NULL AND o.user_id = ANY(%s)",
        (user_id, candidates),
    )
    return [r["user_id"] for r in rows]


async def last_seen(pool: Pool, user_ids: list[str]) -> dict[str, float]:
    rows = await pool.fetch(
        "SELECT id, extract(epoch FROM last_seen)::float8 AS seen FROM users WHERE id = ANY(%s) AND last_seen IS NOT NULL",
        (user_ids,),
    )
    return {r["id"]: r["seen"] for r in rows}


async def membership(pool: Pool, room_id: int, user_id: str) -> dict[str, Any]:
    """The caller's current membership row.

    Raises NotFound when the room does not exist or the caller is not (or no
    longer) a member: rooms a user cannot see do not exist for them (docs §4).
    """
    row = await pool.fetchone(
        "SELECT r.id, r.kind, r.last_seq, m.role, m.joined_seq FROM rooms r"
        " JOIN members m ON m.room_id = r.id AND m.user_id = %s AND m.left_seq IS NULL WHERE r.id = %s",
        (user_id, room_id),
    )
    if row is None:
        raise errors.NotFound("no such room", room_id=room_id)
    return row


async def room_member_ids(pool: Pool, room_id: int) -> list[str]:
    rows = await pool.fetch("SELECT user_id FROM members WHERE room_id = %s AND left_seq IS NULL", (room_id,))
    return [r["user_id"] for r in rows]


async def page(pool: Pool, room_id: int, *, after: int | None = None, before: int | None = None, floor: int, limit: int) -> tuple[list[RoomEvent], bool]:
    """One page of a room's log, ascending, never below ``floor`` (docs/protocol.md §4).

    Only ``after``: the oldest events after it. ``before`` (with or without
    ``after``): the newest events below it (and above ``after``). Neither: the
    newest events. Returns the events and whether more exist in that direction.
    """
    low = max(floor, (after or 0) + 1)
    if after is not None and before is None:
        rows = await pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events ev WHERE room_id = %s AND seq >= %s ORDER BY seq LIMIT %s",
            (room_id, low, limit + 1),
        )
        more = len(rows) > limit
        return [event_from_row(r) for r in rows[:limit]], more
    if after is not None:
        # A bounded range: oldest first, paging forwards inside it.
        rows = await pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events ev WHERE room_id = %s AND seq >= %s AND seq < %s ORDER BY seq LIMIT %s",
            (room_id, low, before, limit + 1),
        )
        more = len(rows) > limit
        return [event_from_row(r) for r in rows[:limit]], more
    rows = await pool.fetch(
        f"SELECT {_EVENT_COLUMNS} FROM events ev WHERE room_id = %s AND seq >= %s AND seq < %s ORDER BY seq DESC LIMIT %s",
        (room_id, low, before if before is not None else 2**62, limit + 1),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    rows.reverse()
    return [event_from_row(r) for r in rows], more


def event_from_row(row: dict[str, Any]) -> RoomEvent:
    """A RoomEvent from a row of ``_EVENT_COLUMNS``, a message in its current state."""
    data = row["data"]
    if isinstance(data, str):
        data = json.loads(data)
    if row["kind"] == "message":
        data = dict(data)
        if row["deleted"]:
            data["deleted"] = True
        else:
            data["body"] = row["body"]
            if row["edited"]:
                data["edited"] = True
            if row["reactions"]:
                data["reactions"] = row["reactions"]
    return RoomEvent(row["room_id"], row["seq"], row["kind"], row["sender"], row["at"], data)


async def room_snapshot(pool: Pool, room_id: int, viewer: str, *, floor: int, latest: int) -> dict[str, Any]:
    """RoomSnapshot for a client too far behind: RoomInfo, members, the newest page."""
    room = room_info_from(await pool.fetchone(ROOM_INFO_SQL, {"viewer": viewer, "room": room_id}))
    members = await pool.fetch(
        "SELECT user_id, role, extract(epoch FROM joined_at)::float8 AS joined_at FROM members"
        " WHERE room_id = %s AND left_seq IS NULL ORDER BY joined_seq, user_id",
        (room_id,),
    )
    events, _ = await page(pool, room_id, floor=floor, limit=latest)
    return {"room": room, "members": members, "last_seq": room["last_seq"], "latest": [e.wire() for e in events]}
