"""Durable mutations: the SQL of every command that changes a room.

Each mutation runs inside the writer's batch transaction (see writer.py). It
checks what it needs with the rows it locks, appends the events it creates to
``tx.events`` and returns the result the client gets. A rejected mutation
raises a chatd error; the writer rolls back its savepoint.

Seqs come from ``rooms.last_seq`` (row-locked, updated in the same transaction),
so they are gapless and strictly increasing with any number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import msgspec
import structlog
from psycopg import errors as pgerr

from chatd import errors
from chatd.domain.model import RoomEvent
from chatd.store import reads
from chatd.store.driver import JSONB_OID, Statement, TrioConnection

log = structlog.get_logger("chatd.store")

Done = Callable[[Any, "errors.ChatdError | None"], None]


def _ignore(result: Any, error: Any) -> None:
    return None


@dataclass(slots=True, kw_only=True)
class Mutation:
    user_id: str
    client_id: str
    on_done: Done = _ignore
    command: ClassVar[str] = ""

    def finish(self, result: Any, error: errors.ChatdError | None) -> None:
        self.on_done(result, error)

    async def apply(self, tx: "Tx") -> dict[str, Any]:
        raise NotImplementedError


class Tx:
    """The writer's open transaction plus the events created in it."""

    def __init__(self, conn: TrioConnection) -> None:
        self.conn = conn
        self.events: list[RoomEvent] = []
        self._now: float | None = None
        self._savepoints = 0

    async def fetchone(self, query: str, params: Any = None) -> dict[str, Any] | None:
        cur = await self.conn.execute(query, params)
        return await cur.fetchone()

    async def fetchall(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        cur = await self.conn.execute(query, params)
        return await cur.fetchall()

    async def now(self) -> float:
        if self._now is None:
            self._now = (await self.fetchone("SELECT extract(epoch FROM now())::float8 AS now"))["now"]
        return self._now

    async def room_for_update(self, room_id: int) -> dict[str, Any]:
        row = await self.fetchone("SELECT id, kind, title, public, last_seq FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        if row is None:
            raise errors.NotFound("no such room", room_id=room_id)
        return row

    async def role_of(self, room_id: int, user_id: str) -> str | None:
        row = await self.fetchone(
            "SELECT role FROM members WHERE room_id = %s AND user_id = %s AND left_seq IS NULL", (room_id, user_id)
        )
        return row["role"] if row else None

    async def member_room(self, room_id: int, user_id: str) -> dict[str, Any]:
        """Lock the room and return it with the caller's role.

        Raises NotFound when the room does not exist or the caller is not a
        member: rooms a user cannot see do not exist for them.
        """
        row = await self.fetchone("SELECT id, kind, title, public, last_seq FROM rooms WHERE id = %s FOR UPDATE", (room_id,))
        role = await self.role_of(room_id, user_id) if row else None
        if role is None:
            raise errors.NotFound("no such room", room_id=room_id)
        row["role"] = role
        return row

    async def require_users(self, user_ids: list[str]) -> None:
        """Raises NotFound naming the first user id that has no account."""
        wanted = sorted(set(user_ids))
        rows = await self.fetchall("SELECT id FROM users WHERE id = ANY(%s)", (wanted,))
        missing = sorted(set(wanted) - {r["id"] for r in rows})
        if missing:
            raise errors.NotFound("no such user", user_id=missing[0])

    async def room_info(self, room_id: int, viewer: str) -> dict[str, Any]:
        """RoomInfo (docs/protocol.md §5.2) as ``viewer`` sees it."""
        return reads.room_info_from(await self.fetchone(reads.ROOM_INFO_SQL, {"viewer": viewer, "room": room_id}))

    async def append(self, room: dict[str, Any], kind: str, sender: str, data: dict[str, Any], body: str | None = None) -> RoomEvent:
        """Add one event to a room locked with :meth:`room_for_update`."""
        room["last_seq"] += 1
        seq = room["last_seq"]
        at = await self.now()
        await self.conn.execute(
            "INSERT INTO events (room_id, seq, kind, sender, data, body, created_at) VALUES (%s, %s, %s, %s, %s, %s, now())",
            (room["id"], seq, kind, sender, json.dumps(data), body),
        )
        await self.conn.execute("UPDATE rooms SET last_seq = %s WHERE id = %s", (seq, room["id"]))
        event = RoomEvent(room["id"], seq, kind, sender, at, data)
        self.events.append(event)
        return event

    async def append_many(self, room: dict[str, Any], items: list[tuple[str, str, dict[str, Any]]]) -> list[RoomEvent]:
        """Add (kind, sender, data) events to a locked room with two statements in all."""
        at = await self.now()
        first = room["last_seq"] + 1
        room["last_seq"] += len(items)
        seqs = list(range(first, room["last_seq"] + 1))
        await self.conn.execute(
            "INSERT INTO events (room_id, seq, kind, sender, data, created_at)"
            " SELECT %s, s, k, u, d::jsonb, now() FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[]) AS t(s, k, u, d)",
            (room["id"], seqs, [i[0] for i in items], [i[1] for i in items], [json.dumps(i[2]) for i in items]),
        )
        await self.conn.execute("UPDATE rooms SET last_seq = %s WHERE id = %s", (room["last_seq"], room["id"]))
        created = [RoomEvent(room["id"], seq, kind, sender, at, data) for seq, (kind, sender, data) in zip(seqs, items)]
        self.events.extend(created)
        return created

    async def apply_one(self, mutation: Mutation) -> tuple[Any, errors.ChatdError | None]:
        """Run one non-send mutation in a savepoint, with its idempotency record.

        A rejected mutation (a chatd error) or a failing one (any other exception:
        a bug, logged and answered ``internal``) rolls back only its savepoint and
        is returned as its outcome. Contention propagates: the writer retries the batch.
        """
        if mutation.client_id:
            previous = await self.fetchone(
                "SELECT result FROM idempotency WHERE user_id = %s AND client_id = %s", (mutation.user_id, mutation.client_id)
            )
            if previous is not None:
                return previous["result"], None
        self._savepoints += 1
        name = f"m{self._savepoints}"
        mark = len(self.events)
        await self.conn.execute(f"SAVEPOINT {name}")
        try:
            result = await mutation.apply(self)
            if mutation.client_id:
                stored = await self.fetchone(
                    "INSERT INTO idempotency (user_id, client_id, command, result) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING RETURNING 1 AS ok",
                    (mutation.user_id, mutation.client_id, mutation.command, json.dumps(result)),
                )
                if stored is None:  # another process committed this key meanwhile
                    raise errors.Contention("idempotency key committed concurrently")
        except errors.Contention:
            raise
        except Exception as exc:  # noqa: BLE001 - one command's bug must not fail the batch or the writer
            if not isinstance(exc, errors.ChatdError):
                log.exception("mutation.failed", command=mutation.command, user_id=mutation.user_id)
                exc = errors.Internal("the server failed to apply this command")
            await self.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            del self.events[mark:]
            return None, exc
        await self.conn.execute(f"RELEASE SAVEPOINT {name}")
        return result, None


# --- messages: the hot path ----------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Send(Mutation):
    room_id: int
    body: str
    reply_to: int | None = None
    command: ClassVar[str] = "send"


# One statement commits a whole run of sends: the idempotency lookup, the membership
# and reply checks, the per-room seq allocation under row locks taken in room-id
# order, the events and their idempotency records. Outside a transaction it commits
# by itself, so a batch of sends is one round trip to the database. A key that a
# concurrent transaction committed meanwhile fails the statement (unique
# violation): the writer retries the batch, which then finds it as a duplicate.
# The statement runs on a generic plan (prepared on each writer connection, again every
# 10 s: chatd/store/driver.py), which cannot know how few rooms a batch names. Rooms are
# looked up by key from an array (`= ANY`), which plans as an index lookup at any table
# size; joined to the batch instead, they were scanned in full, twice per batch, once
# there were a few thousand (docs/decisions.md, "The send statement reaches rooms by key").
_SEND = Statement("chatd_send_batch", """
WITH t AS (
    SELECT (e->>0)::int AS ord, (e->>1)::bigint AS room_id, e->>2 AS user_id, e->>3 AS body,
           (e->>4)::bigint AS reply_to, e->>5 AS client_id
    FROM jsonb_array_elements($1::jsonb) AS e),
looked_up AS MATERIALIZED (
    SELECT t.*,
           (SELECT i.result FROM idempotency i WHERE i.user_id = t.user_id AND i.client_id = t.client_id) AS previous,
           (SELECT m.joined_seq FROM members m
             WHERE m.room_id = t.room_id AND m.user_id = t.user_id AND m.left_seq IS NULL) AS joined_seq
    FROM t),
checked AS (
    SELECT *, previous IS NULL AND joined_seq IS NOT NULL AND (reply_to IS NULL OR (reply_to >= joined_seq AND EXISTS (
               SELECT 1 FROM events e WHERE e.room_id = l.room_id AND e.seq = l.reply_to AND e.kind = 'message'))) AS ok
    FROM looked_up l),
counts AS (
    SELECT room_id, count(*)::int AS n, array_agg(ord ORDER BY ord) AS ords,
           array_agg(user_id ORDER BY ord) AS users, array_agg(body ORDER BY ord) AS bodies,
           array_agg(reply_to ORDER BY ord) AS replies, array_agg(client_id ORDER BY ord) AS cids
    FROM checked WHERE ok GROUP BY room_id),
locked AS (
    SELECT r.id FROM rooms r WHERE r.id = ANY (ARRAY(SELECT room_id FROM counts)) ORDER BY r.id FOR UPDATE),
bumped AS (
    UPDATE rooms r SET last_seq = r.last_seq + c.n FROM counts c
    WHERE r.id = ANY (ARRAY(SELECT id FROM locked)) AND c.room_id = r.id
    RETURNING r.id, r.last_seq - c.n AS base, c.ords, c.users, c.bodies, c.replies, c.cids),
numbered AS (
    SELECT b.id AS room_id, b.base + o.k AS seq, o.ord, o.user_id, o.body, o.reply_to, o.client_id
    FROM bumped b, unnest(b.ords, b.users, b.bodies, b.replies, b.cids) WITH ORDINALITY
        AS o(ord, user_id, body, reply_to, client_id, k)),
ev AS (
    INSERT INTO events (room_id, seq, kind, sender, body, data, created_at)
    SELECT room_id, seq, 'message', user_id, body,
           CASE WHEN reply_to IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('reply_to', reply_to) END, now()
    FROM numbered),
idem AS (
    INSERT INTO idempotency (user_id, client_id, command, result)
    SELECT user_id, client_id, 'send', jsonb_build_object('seq', seq, 'at', extract(epoch FROM now())::float8)
    FROM numbered),
outcome AS (
    SELECT ord, NULL::jsonb AS previous, true AS member, seq, extract(epoch FROM now())::float8 AS at FROM numbered
    UNION ALL
    SELECT ord, previous, joined_seq IS NOT NULL, NULL, NULL FROM checked WHERE NOT ok)
SELECT coalesce(json_agg(json_build_array(ord, previous, member, seq, at)), '[]')::text FROM outcome
""", [JSONB_OID])


_json_rows = msgspec.json.Encoder().encode
_json_outcomes = msgspec.json.Decoder().decode


async def send_batch(
    tx: Tx, sends: list[Send], on_sent: Callable[[], None] | None = None
) -> list[tuple[Any, errors.ChatdError | None]]:
    """Commit a run of sends with one statement, whatever its length.

    ``on_sent`` is called once the statement is on its way to the database.
    """
    outcomes: list[tuple[Any, errors.ChatdError | None]] = [(None, None)] * len(sends)
    first_in_batch: dict[tuple[str, str], int] = {}
    fresh: list[int] = []
    twins: list[tuple[int, int]] = []  # (retry, first) inside this batch: answered from its first
    for i, s in enumerate(sends):
        key = (s.user_id, s.client_id)
        if key in first_in_batch:
            twins.append((i, first_in_batch[key]))
        else:
            first_in_batch[key] = i
            fresh.append(i)
    try:
        # One JSON document each way, encoded and decoded in C: psycopg adapts list
        # parameters element by element in Python, and builds a row object per row.
        reply = await tx.conn.run_statement(_SEND, [_json_rows(
            [(k, s.room_id, s.user_id, s.body, s.reply_to, s.client_id) for k, s in enumerate(sends[i] for i in fresh)]
        )], on_sent=on_sent)
    except pgerr.UniqueViolation as exc:
        if exc.diag.table_name != "idempotency":
            raise
        raise errors.Contention("idempotency key committed concurrently") from exc
    events = tx.events
    for ord_, previous, member, seq, at in _json_outcomes(reply.get_value(0, 0)):
        i = fresh[ord_]
        s = sends[i]
        if previous is not None:
            outcomes[i] = ({**previous, "duplicate": True}, None)
        elif not member:
            outcomes[i] = (None, errors.NotFound("no such room", room_id=s.room_id))
        elif seq is None:
            outcomes[i] = (None, errors.NotFound("reply_to names no message you can see", field="$.reply_to"))
        else:
            outcomes[i] = ({"seq": seq, "at": at, "duplicate": False}, None)
            data: dict[str, Any] = {"body": s.body}
            if s.reply_to is not None:
                data["reply_to"] = s.reply_to
            events.append(RoomEvent(s.room_id, seq, "message", s.user_id, at, data))
    for retry, first in twins:
        result, error = outcomes[first]
        outcomes[retry] = ({**result, "duplicate": True} if result else None, error)
    return outcomes


async def _own_message(tx: Tx, room_id: int, seq: int, user_id: str, *, moderators_too: bool) -> dict[str, Any]:
    room = await tx.member_room(room_id, user_id)
    await _visible_message(tx, room_id, seq, user_id)
    msg = await tx.fetchone("SELECT sender FROM events WHERE room_id = %s AND seq = %s", (room_id, seq))
    moderator = moderators_too and room["kind"] == "group" and room["role"] in ("owner", "admin")
    if msg["sender"] != user_id and not moderator:
        raise errors.Forbidden("not your message", room_id=room_id, seq=seq)
    return room


async def _visible_message(tx: Tx, room_id: int, seq: int, user_id: str) -> None:
    """Raises NotFound unless ``seq`` is a message the member may see, Conflict if deleted."""
    msg = await tx.fetchone(
        "SELECT e.deleted FROM events e JOIN members m ON m.room_id = e.room_id AND m.user_id = %s"
        " WHERE e.room_id = %s AND e.seq = %s AND e.kind = 'message' AND e.seq >= m.joined_seq",
        (user_id, room_id, seq),
    )
    if msg is None:
        raise errors.NotFound("no such message", room_id=room_id, seq=seq)
    if msg["deleted"]:
        raise errors.Conflict("the message was deleted", room_id=room_id, seq=seq)


@dataclass(slots=True, kw_only=True)
class Edit(Mutation):
    room_id: int
    seq: int
    body: str
    command: ClassVar[str] = "edit"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await _own_message(tx, self.room_id, self.seq, self.user_id, moderators_too=False)
        await tx.conn.execute(
            "UPDATE events SET body = %s, edited = true WHERE room_id = %s AND seq = %s", (self.body, self.room_id, self.seq)
        )
        event = await tx.append(room, "edited", self.user_id, {"target_seq": self.seq, "body": self.body})
        return {"seq": event.seq, "at": event.at}


@dataclass(slots=True, kw_only=True)
class Delete(Mutation):
    room_id: int
    seq: int
    command: ClassVar[str] = "delete"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await _own_message(tx, self.room_id, self.seq, self.user_id, moderators_too=True)
        # Soft delete: the content disappears from the message and from every
        # edit of it; the log keeps tombstones so seqs stay gapless.
        await tx.conn.execute(
            "UPDATE events SET body = NULL, deleted = true WHERE room_id = %s AND seq = %s", (self.room_id, self.seq)
        )
        await tx.conn.execute(
            "UPDATE events SET data = data - 'body' WHERE room_id = %s AND kind = 'edited' AND (data->>'target_seq')::bigint = %s",
            (self.room_id, self.seq),
        )
        await tx.conn.execute("DELETE FROM reactions WHERE room_id = %s AND seq = %s", (self.room_id, self.seq))
        event = await tx.append(room, "deleted", self.user_id, {"target_seq": self.seq})
        return {"seq": event.seq}


@dataclass(slots=True, kw_only=True)
class React(Mutation):
    room_id: int
    seq: int
    emoji: str
    add: bool = True
    max_reactions: int = 50
    command: ClassVar[str] = "react"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        await _visible_message(tx, self.room_id, self.seq, self.user_id)
        key = (self.room_id, self.seq, self.emoji, self.user_id)
        if self.add:
            distinct = await tx.fetchone(
                "SELECT count(DISTINCT emoji) AS n, coalesce(bool_or(emoji = %s), false) AS present"
                " FROM reactions WHERE room_id = %s AND seq = %s",
                (self.emoji, self.room_id, self.seq),
            )
            if not distinct["present"] and distinct["n"] >= self.max_reactions:
                raise errors.Conflict("too many different reactions on this message", reason="too_many_reactions")
            changed = await tx.fetchone(
                "INSERT INTO reactions (room_id, seq, emoji, user_id) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1 AS ok",
                key,
            )
            if changed is None:
                raise errors.Conflict("you already reacted with this emoji")
        else:
            changed = await tx.fetchone(
                "DELETE FROM reactions WHERE room_id = %s AND seq = %s AND emoji = %s AND user_id = %s RETURNING 1 AS ok",
                key,
            )
            if changed is None:
                raise errors.NotFound("you have not reacted with this emoji")
        kind = "reaction_added" if self.add else "reaction_removed"
        event = await tx.append(room, kind, self.user_id, {"target_seq": self.seq, "emoji": self.emoji})
        return {"seq": event.seq}


@dataclass(slots=True, kw_only=True)
class MarkRead(Mutation):
    """Monotonic read watermark, clamped to the room's last seq. ``advanced``
    tells the caller whether a receipt is due."""

    room_id: int
    seq: int
    advanced: bool = False
    command: ClassVar[str] = "mark_read"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        row = await tx.fetchone(
            "WITH old AS (SELECT m.read_seq FROM members m WHERE m.room_id = %(room)s AND m.user_id = %(user)s"
            " AND m.left_seq IS NULL FOR UPDATE)"
            " UPDATE members m SET read_seq = greatest(m.read_seq, least(%(seq)s, r.last_seq))"
            " FROM rooms r, old WHERE r.id = m.room_id AND m.room_id = %(room)s AND m.user_id = %(user)s"
            " RETURNING m.read_seq, old.read_seq AS before",
            {"room": self.room_id, "user": self.user_id, "seq": self.seq},
        )
        if row is None:
            raise errors.NotFound("no such room", room_id=self.room_id)
        self.advanced = row["read_seq"] > row["before"]
        return {"read_seq": row["read_seq"]}
