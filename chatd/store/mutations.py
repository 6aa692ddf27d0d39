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
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from chatd import errors
from chatd.domain import rules
from chatd.domain.model import RoomEvent, dm_key
from chatd.store.driver import TrioConnection

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

    async def ensure_users(self, user_ids: list[str]) -> None:
        await self.conn.execute(
            "INSERT INTO users (id) SELECT unnest(%s::text[]) ON CONFLICT DO NOTHING", (sorted(set(user_ids)),)
        )

    async def apply_one(self, mutation: Mutation) -> tuple[Any, errors.ChatdError | None]:
        """Run one non-send mutation in a savepoint, with its idempotency record."""
        if mutation.client_id:
            previous = await self.fetchone(
                "SELECT result FROM idempotency WHERE user_id = %s AND client_id = %s", (mutation.user_id, mutation.client_id)
            )
            if previous is not None:
                return {**previous["result"], "duplicate": True}, None
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
        except errors.ChatdError as exc:
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
    for i, key in enumerate(keys):
        if key in previous:
            outcomes[i] = ({**previous[key], "duplicate": True}, None)
        elif key in first_in_batch:
            continue  # answered from its twin below
        else:
            first_in_batch[key] = i
            fresh.append(i)
    if fresh:
        pairs = await tx.fetchall(
            "SELECT m.room_id, m.user_id FROM members m"
            " JOIN unnest(%s::bigint[], %s::text[]) AS k(room_id, user_id) USING (room_id, user_id)"
            " WHERE m.left_seq IS NULL",
            ([sends[i].room_id for i in fresh], [sends[i].user_id for i in fresh]),
        )
        allowed = {(r["room_id"], r["user_id"]) for r in pairs}
        accepted = []
        for i in fresh:
            if (sends[i].room_id, sends[i].user_id) in allowed:
                accepted.append(i)
            else:
                outcomes[i] = (None, errors.Forbidden("not a member of this room", room_id=sends[i].room_id))
        if accepted:
            await _insert_messages(tx, sends, accepted, outcomes)
    for key, i in first_in_batch.items():
        twins = [j for j, k in enumerate(keys) if k == key and j != i]
        for j in twins:
            result, error = outcomes[i]
            outcomes[j] = ({**result, "duplicate": True} if result else None, error)
    return outcomes


async def _insert_messages(tx: Tx, sends: list[Send], accepted: list[int], outcomes: list) -> None:
    counts: dict[int, int] = {}
    for i in accepted:
        counts[sends[i].room_id] = counts.get(sends[i].room_id, 0) + 1
    room_ids = sorted(counts)
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
    cols: dict[str, list] = {"room": [], "seq": [], "sender": [], "body": [], "data": [], "user": [], "cid": [], "res": []}
    for i in accepted:
        s = sends[i]
        seq = next_seq[s.room_id]
        next_seq[s.room_id] = seq + 1
        data: dict[str, Any] = {"body": s.body}
        if s.reply_to is not None:
            data["reply_to"] = s.reply_to
        result = {"seq": seq, "at": at, "room_id": s.room_id}
        outcomes[i] = ({**result, "duplicate": False}, None)
        tx.events.append(RoomEvent(s.room_id, seq, "message", s.user_id, at, data))
        cols["room"].append(s.room_id)
        cols["seq"].append(seq)
        cols["sender"].append(s.user_id)
        cols["body"].append(s.body)
        cols["data"].append(json.dumps({"reply_to": s.reply_to} if s.reply_to is not None else {}))
        cols["user"].append(s.user_id)
        cols["cid"].append(s.client_id)
        cols["res"].append(json.dumps(result))
    await tx.conn.execute(
        "INSERT INTO events (room_id, seq, kind, sender, body, data, created_at)"
        " SELECT r, s, 'message', u, b, d::jsonb, now()"
        " FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[]) AS t(r, s, u, b, d)",
        (cols["room"], cols["seq"], cols["sender"], cols["body"], cols["data"]),
    )
    stored = await tx.fetchall(
        "INSERT INTO idempotency (user_id, client_id, command, result)"
        " SELECT u, c, 'send', r::jsonb FROM unnest(%s::text[], %s::text[], %s::text[]) AS t(u, c, r)"
        " ON CONFLICT DO NOTHING RETURNING 1 AS ok",
        (cols["user"], cols["cid"], cols["res"]),
    )
    if len(stored) != len(accepted):
        raise errors.Contention("idempotency key committed concurrently")


async def _own_message(tx: Tx, room_id: int, seq: int, user_id: str, *, moderators_too: bool) -> dict[str, Any]:
    room = await tx.room_for_update(room_id)
    role = await tx.role_of(room_id, user_id)
    if role is None:
        raise errors.Forbidden("not a member of this room", room_id=room_id)
    msg = await tx.fetchone(
        "SELECT sender, deleted FROM events WHERE room_id = %s AND seq = %s AND kind = 'message'", (room_id, seq)
    )
    if msg is None:
        raise errors.NotFound("no such message", room_id=room_id, seq=seq)
    if msg["deleted"]:
        raise errors.Conflict("message was deleted", room_id=room_id, seq=seq)
    if msg["sender"] != user_id and not (moderators_too and role in ("owner", "admin")):
        raise errors.Forbidden("not your message", room_id=room_id, seq=seq)
    room["role"] = role
    return room


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
        return {"seq": event.seq, "target_seq": self.seq, "at": event.at}


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
        return {"seq": event.seq, "target_seq": self.seq, "at": event.at}


@dataclass(slots=True, kw_only=True)
class React(Mutation):
    room_id: int
    seq: int
    emoji: str
    add: bool = True
    max_reactions: int = 50
    command: ClassVar[str] = "react"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        if await tx.role_of(self.room_id, self.user_id) is None:
            raise errors.Forbidden("not a member of this room", room_id=self.room_id)
        msg = await tx.fetchone(
            "SELECT deleted FROM events WHERE room_id = %s AND seq = %s AND kind = 'message'", (self.room_id, self.seq)
        )
        if msg is None or msg["deleted"]:
            raise errors.NotFound("no such message", room_id=self.room_id, seq=self.seq)
        if self.add:
            distinct = await tx.fetchone(
                "SELECT count(DISTINCT emoji) AS n, bool_or(emoji = %s) AS present FROM reactions WHERE room_id = %s AND seq = %s",
                (self.emoji, self.room_id, self.seq),
            )
            if not distinct["present"] and distinct["n"] >= self.max_reactions:
                raise errors.TooLarge("too many different reactions on this message", limit=self.max_reactions)
            changed = await tx.fetchone(
                "INSERT INTO reactions (room_id, seq, emoji, user_id) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1 AS ok",
                (self.room_id, self.seq, self.emoji, self.user_id),
            )
        else:
            changed = await tx.fetchone(
                "DELETE FROM reactions WHERE room_id = %s AND seq = %s AND emoji = %s AND user_id = %s RETURNING 1 AS ok",
                (self.room_id, self.seq, self.emoji, self.user_id),
            )
        if changed is None:
            # Already in the asked state: nothing new enters the log.
            return {"seq": None, "target_seq": self.seq, "changed": False}
        kind = "reaction_added" if self.add else "reaction_removed"
        event = await tx.append(room, kind, self.user_id, {"target_seq": self.seq, "emoji": self.emoji})
        return {"seq": event.seq, "target_seq": self.seq, "changed": True}


@dataclass(slots=True, kw_only=True)
class MarkRead(Mutation):
    room_id: int
    seq: int
    command: ClassVar[str] = "mark_read"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        row = await tx.fetchone(
            "UPDATE members m SET read_seq = greatest(m.read_seq, least(%s, r.last_seq))"
            " FROM rooms r WHERE r.id = m.room_id AND m.room_id = %s AND m.user_id = %s AND m.left_seq IS NULL"
            " RETURNING m.read_seq",
            (self.seq, self.room_id, self.user_id),
        )
        if row is None:
            raise errors.Forbidden("not a member of this room", room_id=self.room_id)
        return {"room_id": self.room_id, "read_seq": row["read_seq"]}


# --- rooms and membership -------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class CreateGroup(Mutation):
    title: str
    members: list[str] = field(default_factory=list)
    public: bool = False
    max_members: int = 1000
    command: ClassVar[str] = "create_group"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        others = sorted(set(self.members) - {self.user_id})
        if len(others) + 1 > self.max_members:
            raise errors.TooLarge("too many members", limit=self.max_members)
        await tx.ensure_users([self.user_id, *others])
        row = await tx.fetchone(
            "INSERT INTO rooms (kind, title, public, created_by) VALUES ('group', %s, %s, %s)"
            " RETURNING id, kind, title, public, last_seq",
            (self.title, self.public, self.user_id),
        )
        await tx.append(row, "room_created", self.user_id, {"title": self.title, "kind": "group", "public": self.public})
        await _add_member(tx, row, self.user_id, "owner", by=self.user_id)
        for user in others:
            await _add_member(tx, row, user, "member", by=self.user_id)
        return {"room_id": row["id"], "seq": row["last_seq"]}


@dataclass(slots=True, kw_only=True)
class CreateDm(Mutation):
    other: str
    command: ClassVar[str] = "create_dm"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        if self.other == self.user_id:
            raise errors.InvalidField("a direct message needs another user", field="$.user_id")
        key = dm_key(self.user_id, self.other)
        await tx.ensure_users([self.user_id, self.other])
        row = await tx.fetchone(
            "INSERT INTO rooms (kind, title, dm_key, created_by) VALUES ('dm', '', %s, %s)"
            " ON CONFLICT (dm_key) DO NOTHING RETURNING id, kind, title, public, last_seq",
            (key, self.user_id),
        )
        if row is None:  # the pair already has its DM: the same room, always
            existing = await tx.fetchone("SELECT id, last_seq FROM rooms WHERE dm_key = %s", (key,))
            return {"room_id": existing["id"], "seq": existing["last_seq"], "created": False}
        await tx.append(row, "room_created", self.user_id, {"title": "", "kind": "dm", "public": False})
        for user in sorted({self.user_id, self.other}):
            await _add_member(tx, row, user, "member", by=self.user_id)
        return {"room_id": row["id"], "seq": row["last_seq"], "created": True}


async def _add_member(tx: Tx, room: dict[str, Any], user_id: str, role: str, *, by: str | None) -> RoomEvent:
    event = await tx.append(room, "member_joined", by or user_id, {"user_id": user_id, "role": role, "by": by})
    await tx.conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined_seq, read_seq) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role, joined_seq = excluded.joined_seq,"
        " left_seq = NULL, left_at = NULL, joined_at = now(), read_seq = excluded.read_seq",
        (room["id"], user_id, role, event.seq, event.seq),
    )
    return event


async def _remove_member(tx: Tx, room: dict[str, Any], user_id: str, *, by: str, removed: bool) -> RoomEvent:
    event = await tx.append(room, "member_left", by, {"user_id": user_id, "by": by, "removed": removed})
    await tx.conn.execute(
        "UPDATE members SET left_seq = %s, left_at = now() WHERE room_id = %s AND user_id = %s",
        (event.seq, room["id"], user_id),
    )
    return event


@dataclass(slots=True, kw_only=True)
class Join(Mutation):
    room_id: int
    command: ClassVar[str] = "join"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        rules.check_join(room["kind"], room["public"], await tx.role_of(self.room_id, self.user_id) is not None)
        await tx.ensure_users([self.user_id])
        event = await _add_member(tx, room, self.user_id, "member", by=None)
        return {"room_id": self.room_id, "seq": event.seq}


@dataclass(slots=True, kw_only=True)
class Leave(Mutation):
    room_id: int
    command: ClassVar[str] = "leave"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        role = await tx.role_of(self.room_id, self.user_id)
        rules.check_leave(room["kind"], role is not None)
        event = await _remove_member(tx, room, self.user_id, by=self.user_id, removed=False)
        if role == "owner":
            await _hand_over_ownership(tx, room)
        return {"room_id": self.room_id, "seq": event.seq}


async def _hand_over_ownership(tx: Tx, room: dict[str, Any]) -> None:
    rows = await tx.fetchall(
        "SELECT user_id, role, joined_seq FROM members WHERE room_id = %s AND left_seq IS NULL", (room["id"],)
    )
    if any(r["role"] == "owner" for r in rows):
        return
    heir = rules.successor([(r["user_id"], r["role"], r["joined_seq"]) for r in rows])
    if heir is not None:
        await tx.conn.execute("UPDATE members SET role = 'owner' WHERE room_id = %s AND user_id = %s", (room["id"], heir))
        await tx.append(room, "role_changed", heir, {"user_id": heir, "role": "owner", "by": None})


@dataclass(slots=True, kw_only=True)
class AddMember(Mutation):
    room_id: int
    target: str
    role: str = "member"
    max_members: int = 1000
    command: ClassVar[str] = "add_member"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        rules.check_add(room["kind"], await tx.role_of(self.room_id, self.user_id), self.role)
        if await tx.role_of(self.room_id, self.target) is not None:
            raise errors.Conflict("already a member", user_id=self.target)
        count = await tx.fetchone("SELECT count(*) AS n FROM members WHERE room_id = %s AND left_seq IS NULL", (self.room_id,))
        if count["n"] >= self.max_members:
            raise errors.TooLarge("the room is full", limit=self.max_members)
        await tx.ensure_users([self.target])
        event = await _add_member(tx, room, self.target, self.role, by=self.user_id)
        return {"room_id": self.room_id, "seq": event.seq}


@dataclass(slots=True, kw_only=True)
class RemoveMember(Mutation):
    room_id: int
    target: str
    command: ClassVar[str] = "remove_member"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        actor_role = await tx.role_of(self.room_id, self.user_id)
        target_role = await tx.role_of(self.room_id, self.target)
        rules.check_remove(room["kind"], self.user_id, actor_role, self.target, target_role)
        event = await _remove_member(tx, room, self.target, by=self.user_id, removed=True)
        return {"room_id": self.room_id, "seq": event.seq}


@dataclass(slots=True, kw_only=True)
class SetRole(Mutation):
    room_id: int
    target: str
    role: str
    command: ClassVar[str] = "set_role"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        actor_role = await tx.role_of(self.room_id, self.user_id)
        target_role = await tx.role_of(self.room_id, self.target)
        rules.check_set_role(room["kind"], self.user_id, actor_role, self.target, target_role, self.role)
        await tx.conn.execute(
            "UPDATE members SET role = %s WHERE room_id = %s AND user_id = %s", (self.role, self.room_id, self.target)
        )
        event = await tx.append(room, "role_changed", self.user_id, {"user_id": self.target, "role": self.role, "by": self.user_id})
        return {"room_id": self.room_id, "seq": event.seq}


@dataclass(slots=True, kw_only=True)
class UpdateRoom(Mutation):
    room_id: int
    title: str
    command: ClassVar[str] = "update_room"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.room_for_update(self.room_id)
        rules.check_update(room["kind"], await tx.role_of(self.room_id, self.user_id))
        await tx.conn.execute("UPDATE rooms SET title = %s WHERE id = %s", (self.title, self.room_id))
        event = await tx.append(room, "room_updated", self.user_id, {"title": self.title})
        return {"room_id": self.room_id, "seq": event.seq}
