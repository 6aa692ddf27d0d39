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

_EVENT_COLUMNS = "room_id, seq, kind, sender, extract(epoch FROM created_at)::float8 AS at, data, body, edited, deleted"


async def ensure_user(pool: Pool, user_id: str) -> dict[str, Any]:
    """Create the user row on first sight (the token issuer is the authority on users)."""
    row = await pool.fetchone(
        "INSERT INTO users (id) VALUES (%s) ON CONFLICT (id) DO UPDATE SET id = excluded.id"
        " RETURNING id, display_name, disabled",
        (user_id,),
    )
    return row


async def room_summaries(pool: Pool, user_id: str, room_ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The caller's current rooms with last seq, read watermark and unread count."""
    only = "AND r.id = ANY(%(ids)s)" if room_ids is not None else ""
    rows = await pool.fetch(
        f"""
        SELECT r.id AS room_id, r.kind, r.title, r.public, m.role, r.last_seq, m.read_seq, m.joined_seq,
               (SELECT count(*) FROM (SELECT 1 FROM events e
                   WHERE e.room_id = r.id AND e.seq > m.read_seq AND e.kind = 'message'
                     AND NOT e.deleted AND e.sender <> m.user_id LIMIT {UNREAD_CAP}) u) AS unread,
               (SELECT o.user_id FROM members o WHERE r.kind = 'dm' AND o.room_id = r.id AND o.user_id <> m.user_id) AS peer
        FROM members m JOIN rooms r ON r.id = m.room_id
        WHERE m.user_id = %(user)s AND m.left_seq IS NULL {only}
        ORDER BY r.id
        """,
        {"user": user_id, "ids": room_ids},
    )
    for row in rows:
        if row["peer"] is None:
            del row["peer"]
    return rows


async def membership(pool: Pool, room_id: int, user_id: str) -> dict[str, Any]:
    """The caller's current membership row. Raises NotFound (no room) or Forbidden."""
    row = await pool.fetchone(
        "SELECT r.id, r.kind, r.last_seq, m.role, m.joined_seq, m.left_seq FROM rooms r"
        " LEFT JOIN members m ON m.room_id = r.id AND m.user_id = %s WHERE r.id = %s",
        (user_id, room_id),
    )
    if row is None:
        raise errors.NotFound("no such room", room_id=room_id)
    if row["role"] is None or row["left_seq"] is not None:
        raise errors.Forbidden("not a member of this room", room_id=room_id)
    return row


async def room_member_ids(pool: Pool, room_id: int) -> list[str]:
    rows = await pool.fetch("SELECT user_id FROM members WHERE room_id = %s AND left_seq IS NULL", (room_id,))
    return [r["user_id"] for r in rows]


async def dm_peers(pool: Pool, user_id: str) -> list[str]:
    """Users who share a DM with ``user_id`` (they see each other's presence)."""
    rows = await pool.fetch(
        "SELECT o.user_id FROM members m JOIN rooms r ON r.id = m.room_id AND r.kind = 'dm'"
        " JOIN members o ON o.room_id = m.room_id AND o.user_id <> m.user_id"
        " WHERE m.user_id = %s AND m.left_seq IS NULL",
        (user_id,),
    )
    return [r["user_id"] for r in rows]


async def page(pool: Pool, room_id: int, *, after: int | None = None, before: int | None = None, floor: int, limit: int) -> tuple[list[RoomEvent], bool]:
    """Events of one room with seq > after (ascending) or seq < before (latest first
    internally, returned ascending), never below ``floor``; plus whether more exist."""
    if after is not None:
        rows = await pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE room_id = %s AND seq > %s AND seq >= %s ORDER BY seq LIMIT %s",
            (room_id, after, floor, limit + 1),
        )
    else:
        rows = await pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE room_id = %s AND seq < %s AND seq >= %s ORDER BY seq DESC LIMIT %s",
            (room_id, before if before is not None else 2**62, floor, limit + 1),
        )
        rows.reverse()
        if len(rows) > limit:
            rows = rows[1:]
            return await _events(pool, room_id, rows), True
        return await _events(pool, room_id, rows), False
    more = len(rows) > limit
    return await _events(pool, room_id, rows[:limit]), more


async def _events(pool: Pool, room_id: int, rows: list[dict[str, Any]]) -> list[RoomEvent]:
    message_seqs = [r["seq"] for r in rows if r["kind"] == "message" and not r["deleted"]]
    reactions: dict[int, dict[str, list[str]]] = {}
    if message_seqs:
        for r in await pool.fetch(
            "SELECT seq, emoji, array_agg(user_id ORDER BY created_at) AS users FROM reactions"
            " WHERE room_id = %s AND seq = ANY(%s) GROUP BY seq, emoji ORDER BY seq, min(created_at)",
            (room_id, message_seqs),
        ):
            reactions.setdefault(r["seq"], {})[r["emoji"]] = r["users"]
    return [event_from_row(r, reactions.get(r["seq"])) for r in rows]


def event_from_row(row: dict[str, Any], reactions: dict[str, list[str]] | None = None) -> RoomEvent:
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
            if reactions:
                data["reactions"] = reactions
    return RoomEvent(row["room_id"], row["seq"], row["kind"], row["sender"], row["at"], data)


async def room_snapshot(pool: Pool, room_id: int, *, floor: int, latest: int) -> dict[str, Any]:
    """Current room state for a client too far behind: room, members, latest page."""
    room = await pool.fetchone(
        "SELECT id AS room_id, kind, title, public, created_by, extract(epoch FROM created_at)::float8 AS created_at, last_seq"
        " FROM rooms WHERE id = %s",
        (room_id,),
    )
    members = await pool.fetch(
        "SELECT user_id, role, joined_seq, read_seq FROM members WHERE room_id = %s AND left_seq IS NULL ORDER BY joined_seq",
        (room_id,),
    )
    events, _ = await page(pool, room_id, before=None, floor=floor, limit=latest)
    return {"room": room, "members": members, "last_seq": room["last_seq"], "latest": events}
