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

import structlog
import trio

from chatd import errors
from chatd.domain.model import RoomEvent
from chatd.store import reads
from chatd.store.driver import TrioConnection

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

    def __init__(self, conn: TrioConnection, *, turn: trio.Event | None = None) -> None:
        self.conn = conn
        # Set when the writer's previous batch has ended its transaction: rows that
        # give out seqs are locked only after that, so seqs follow batch order.
        self.turn = turn
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


async def send_batch(tx: Tx, sends: list[Send]) -> list[tuple[Any, errors.ChatdError | None]]:
    """Commit a run of sends with a fixed number of statements, whatever its length."""
    outcomes: list[tuple[Any, errors.ChatdError | None]] = [(None, None)] * len(sends)
    keys = [(s.user_id, s.client_id) for s in sends]
    rows = await tx.fetchall(
        "SELECT i.user_id, i.client_id, i.result FROM idempotency i"
        " JOIN unnest(%s::text[], %s::text[]) AS k(user_id, client_id) USING (user_id, client_id)",
        ([k[0] for k in keys], [k[1] for k in keys]),
    )
    previous = {(r["user_id"], r["client_id"]): r["result"] for r in rows}
    fresh: list[int] = []
    first_in_batch: dict[tuple[str, str], int] = {}
    twins: list[tuple[int, int]] = []  # (retry, first) inside this batch
    for i, key in enumerate(keys):
        if key in previous:
            outcomes[i] = ({**previous[key], "duplicate": True}, None)
        elif key in first_in_batch:
            twins.append((i, first_in_batch[key]))  # answered from its first below
        else:
            first_in_batch[key] = i
            fresh.append(i)
    if fresh:
        pairs = await tx.fetchall(
            "SELECT m.room_id, m.user_id, m.joined_seq FROM members m"
            " JOIN unnest(%s::bigint[], %s::text[]) AS k(room_id, user_id) USING (room_id, user_id)"
            " WHERE m.left_seq IS NULL",
            ([sends[i].room_id for i in fresh], [sends[i].user_id for i in fresh]),
        )
        allowed = {(r["room_id"], r["user_id"]): r["joined_seq"] for r in pairs}
        replies = await _valid_replies(tx, [sends[i] for i in fresh if sends[i].reply_to is not None])
        accepted = []
        for i in fresh:
            s = sends[i]
            joined = allowed.get((s.room_id, s.user_id))
            if joined is None:
                outcomes[i] = (None, errors.NotFound("no such room", room_id=s.room_id))
            elif s.reply_to is not None and not (s.reply_to >= joined and (s.room_id, s.reply_to) in replies):
                outcomes[i] = (None, errors.NotFound("reply_to names no message you can see", field="$.reply_to"))
            else:
                accepted.append(i)
        if accepted:
            await _insert_messages(tx, sends, accepted, outcomes)
    for retry, first in twins:
        result, error = outcomes[first]
        outcomes[retry] = ({**result, "duplicate": True} if result else None, error)
    return outcomes


async def _valid_replies(tx: Tx, sends: list[Send]) -> set[tuple[int, int]]:
    if not sends:
        return set()
    rows = await tx.fetchall(
        "SELECT e.room_id, e.seq FROM events e JOIN unnest(%s::bigint[], %s::bigint[]) AS k(room_id, seq)"
        " USING (room_id, seq) WHERE e.kind = 'message'",
        ([s.room_id for s in sends], [s.reply_to for s in sends]),
    )
    return {(r["room_id"], r["seq"]) for r in rows}


async def _insert_messages(tx: Tx, sends: list[Send], accepted: list[int], outcomes: list) -> None:
    counts: dict[int, int] = {}
    for i in accepted:
        counts[sends[i].room_id] = counts.get(sends[i].room_id, 0) + 1
    room_ids = sorted(counts)
    if tx.turn is not None:
        await tx.turn.wait()
        tx.turn = None
    # Lock the rooms in id order (no deadlock between processes), then move
    # each room's last_seq by the number of messages it gets.
    rows = await tx.fetchall(
        "WITH locked AS (SELECT id FROM rooms WHERE id = ANY(%s) ORDER BY id FOR UPDATE)"
        " UPDATE rooms r SET last_seq = r.last_seq + c.n"
        " FROM unnest(%s::bigint[], %s::int[]) AS c(id, n)"
        " WHERE r.id = c.id AND r.id IN (SELECT id FROM locked)"
        " RETURNING r.id, r.last_seq, extract(epoch FROM now())::float8 AS at",
        (room_ids, room_ids, [counts[r] for r in room_ids]),
    )
    next_seq = {r["id"]: r["last_seq"] - counts[r["id"]] + 1 for r in rows}
    at = rows[0]["at"]
    room_col, seq_col, user_col, body_col, reply_col, cid_col = [], [], [], [], [], []
    events = tx.events
    for i in accepted:
        s = sends[i]
        seq = next_seq[s.room_id]
        next_seq[s.room_id] = seq + 1
        data: dict[str, Any] = {"body": s.body}
        if s.reply_to is not None:
            data["reply_to"] = s.reply_to
        outcomes[i] = ({"seq": seq, "at": at, "duplicate": False}, None)
        events.append(RoomEvent(s.room_id, seq, "message", s.user_id, at, data))
        room_col.append(s.room_id)
        seq_col.append(seq)
        user_col.append(s.user_id)
        body_col.append(s.body)
        reply_col.append(s.reply_to)
        cid_col.append(s.client_id)
    # One statement for the rows and their idempotency records; JSON is built by
    # PostgreSQL, not per row in Python.
    row = await tx.fetchone(
        "WITH t AS (SELECT * FROM unnest(%(room)s::bigint[], %(seq)s::bigint[], %(user)s::text[],"
        "                                %(body)s::text[], %(reply)s::bigint[], %(cid)s::text[])"
        "           AS t(room_id, seq, user_id, body, reply_to, client_id)),"
        " ev AS (INSERT INTO events (room_id, seq, kind, sender, body, data, created_at)"
        "        SELECT room_id, seq, 'message', user_id, body,"
        "               CASE WHEN reply_to IS NULL THEN '{}'::jsonb ELSE jsonb_build_object('reply_to', reply_to) END,"
        "               now() FROM t),"
        " idem AS (INSERT INTO idempotency (user_id, client_id, command, result)"
        "          SELECT user_id, client_id, 'send', jsonb_build_object('seq', seq, 'at', %(at)s::float8) FROM t"
        "          ON CONFLICT DO NOTHING RETURNING 1)"
        " SELECT count(*) AS stored FROM idem",
        {"room": room_col, "seq": seq_col, "user": user_col, "body": body_col, "reply": reply_col, "cid": cid_col, "at": at},
    )
    if row["stored"] != len(accepted):
        raise errors.Contention("idempotency key committed concurrently")


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
