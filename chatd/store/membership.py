"""Durable mutations that create rooms and change who is in them.

Rules (who may do what) live in chatd.domain.rules; these classes fetch and
lock what the rules need, apply them, and write the room's log. Results follow
docs/protocol.md §4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from chatd import errors
from chatd.domain import rules
from chatd.domain.model import RoomEvent, dm_key
from chatd.store.mutations import Mutation, Tx


async def _add_member(tx: Tx, room: dict[str, Any], user_id: str, role: str, *, by: str | None, visible_from: int | None = None) -> RoomEvent:
    data: dict[str, Any] = {"user_id": user_id, "role": role}
    if by is not None and by != user_id:
        data["by"] = by
    event = await tx.append(room, "member_joined", by or user_id, data)
    joined = visible_from if visible_from is not None else event.seq
    await tx.conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined_seq, read_seq) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (room_id, user_id) DO UPDATE SET role = excluded.role, joined_seq = excluded.joined_seq,"
        " left_seq = NULL, left_at = NULL, joined_at = now(), read_seq = excluded.read_seq",
        (room["id"], user_id, role, joined, joined - 1),
    )
    return event


async def _remove_member(tx: Tx, room: dict[str, Any], user_id: str, *, by: str) -> RoomEvent:
    data: dict[str, Any] = {"user_id": user_id, "removed": by != user_id}
    if by != user_id:
        data["by"] = by
    event = await tx.append(room, "member_left", by, data)
    await tx.conn.execute(
        "UPDATE members SET left_seq = %s, left_at = now() WHERE room_id = %s AND user_id = %s",
        (event.seq, room["id"], user_id),
    )
    return event


async def _count_members(tx: Tx, room_id: int) -> int:
    row = await tx.fetchone("SELECT count(*) AS n FROM members WHERE room_id = %s AND left_seq IS NULL", (room_id,))
    return row["n"]


@dataclass(slots=True, kw_only=True)
class CreateGroup(Mutation):
    title: str
    members: list[str] = field(default_factory=list)
    public: bool = False
    max_members: int = 1000
    command: ClassVar[str] = "create_group"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        others = list(dict.fromkeys(u for u in self.members if u != self.user_id))
        if len(others) + 1 > self.max_members:
            raise errors.Conflict("too many members", reason="room_full", limit=self.max_members)
        await tx.require_users([self.user_id, *others])
        room = await tx.fetchone(
            "INSERT INTO rooms (kind, title, public, created_by) VALUES ('group', %s, %s, %s)"
            " RETURNING id, kind, title, public, last_seq",
            (self.title, self.public, self.user_id),
        )
        # The whole creation in a fixed number of statements, however many members:
        # room_created, the owner's join, then one join per member in list order.
        items = [("room_created", self.user_id, {"title": self.title, "kind": "group"}),
                 ("member_joined", self.user_id, {"user_id": self.user_id, "role": "owner"})]
        items += [("member_joined", self.user_id, {"user_id": u, "role": "member", "by": self.user_id}) for u in others]
        await tx.append_many(room, items)
        # Members added at creation see the room from seq 1 (its creation).
        await tx.conn.execute(
            "INSERT INTO members (room_id, user_id, role, joined_seq, read_seq)"
            " SELECT %s, u, r, 1, 0 FROM unnest(%s::text[], %s::text[]) AS t(u, r)",
            (room["id"], [self.user_id, *others], ["owner"] + ["member"] * len(others)),
        )
        return {"room": await tx.room_info(room["id"], self.user_id)}


@dataclass(slots=True, kw_only=True)
class CreateDm(Mutation):
    other: str
    command: ClassVar[str] = "create_dm"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        if self.other == self.user_id:
            raise errors.InvalidField("a direct message needs another user", field="$.user_id")
        await tx.require_users([self.user_id, self.other])
        key = dm_key(self.user_id, self.other)
        room = await tx.fetchone(
            "INSERT INTO rooms (kind, title, dm_key, created_by) VALUES ('dm', '', %s, %s)"
            " ON CONFLICT (dm_key) DO NOTHING RETURNING id, kind, title, public, last_seq",
            (key, self.user_id),
        )
        if room is None:  # the pair already has its DM: the same room, always
            existing = await tx.fetchone("SELECT id FROM rooms WHERE dm_key = %s", (key,))
            return {"room": await tx.room_info(existing["id"], self.user_id)}
        await tx.append(room, "room_created", self.user_id, {"title": "", "kind": "dm"})
        await _add_member(tx, room, self.user_id, "member", by=None, visible_from=1)
        await _add_member(tx, room, self.other, "member", by=self.user_id, visible_from=1)
        return {"room": await tx.room_info(room["id"], self.user_id)}


@dataclass(slots=True, kw_only=True)
class Join(Mutation):
    room_id: int
    command: ClassVar[str] = "join"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.fetchone("SELECT id, kind, title, public, last_seq FROM rooms WHERE id = %s FOR UPDATE", (self.room_id,))
        if room is None:
            raise errors.NotFound("no such room", room_id=self.room_id)
        rules.check_join(room["kind"], room["public"], await tx.role_of(self.room_id, self.user_id) is not None)
        role = "owner" if await _count_members(tx, self.room_id) == 0 else "member"
        event = await _add_member(tx, room, self.user_id, role, by=None)
        return {"room": await tx.room_info(self.room_id, self.user_id), "seq": event.seq}


@dataclass(slots=True, kw_only=True)
class Leave(Mutation):
    room_id: int
    command: ClassVar[str] = "leave"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        rules.check_leave(room["kind"])
        event = await _remove_member(tx, room, self.user_id, by=self.user_id)
        if room["role"] == "owner":
            await _hand_over_ownership(tx, room, self.user_id)
        return {"seq": event.seq}


async def _hand_over_ownership(tx: Tx, room: dict[str, Any], leaver: str) -> None:
    # Join order is the seq of the member_joined event that began each membership.
    # Members added at creation all have joined_seq 1 (they see the room from its
    # start), so their order comes from their member_joined events in that log.
    rows = await tx.fetchall(
        "SELECT m.user_id, m.role, j.seq AS joined FROM members m CROSS JOIN LATERAL ("
        " SELECT e.seq FROM events e WHERE e.room_id = m.room_id AND e.seq >= m.joined_seq"
        " AND e.kind = 'member_joined' AND e.data->>'user_id' = m.user_id ORDER BY e.seq LIMIT 1) j"
        " WHERE m.room_id = %s AND m.left_seq IS NULL",
        (room["id"],),
    )
    if any(r["role"] == "owner" for r in rows):
        return
    heir = rules.successor([(r["user_id"], r["role"], r["joined"]) for r in rows])
    if heir is not None:
        await tx.conn.execute("UPDATE members SET role = 'owner' WHERE room_id = %s AND user_id = %s", (room["id"], heir))
        await tx.append(room, "role_changed", leaver, {"user_id": heir, "role": "owner"})


@dataclass(slots=True, kw_only=True)
class AddMember(Mutation):
    room_id: int
    target: str
    role: str = "member"
    max_members: int = 1000
    command: ClassVar[str] = "add_member"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        rules.check_add(room["kind"], room["role"], self.role)
        await tx.require_users([self.target])
        if await tx.role_of(self.room_id, self.target) is not None:
            raise errors.Conflict("already a member", user_id=self.target)
        if await _count_members(tx, self.room_id) >= self.max_members:
            raise errors.Conflict("the room is full", reason="room_full", limit=self.max_members)
        event = await _add_member(tx, room, self.target, self.role, by=self.user_id)
        return {"seq": event.seq}


@dataclass(slots=True, kw_only=True)
class RemoveMember(Mutation):
    room_id: int
    target: str
    command: ClassVar[str] = "remove_member"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        target_role = await tx.role_of(self.room_id, self.target)
        rules.check_remove(room["kind"], self.user_id, room["role"], self.target, target_role)
        event = await _remove_member(tx, room, self.target, by=self.user_id)
        return {"seq": event.seq}


@dataclass(slots=True, kw_only=True)
class SetRole(Mutation):
    room_id: int
    target: str
    role: str
    command: ClassVar[str] = "set_role"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        target_role = await tx.role_of(self.room_id, self.target)
        owners = await tx.fetchone(
            "SELECT count(*) AS n FROM members WHERE room_id = %s AND role = 'owner' AND left_seq IS NULL", (self.room_id,)
        )
        rules.check_set_role(room["kind"], self.user_id, room["role"], self.target, target_role, self.role, owners["n"])
        await tx.conn.execute(
            "UPDATE members SET role = %s WHERE room_id = %s AND user_id = %s", (self.role, self.room_id, self.target)
        )
        event = await tx.append(room, "role_changed", self.user_id, {"user_id": self.target, "role": self.role})
        return {"seq": event.seq}


@dataclass(slots=True, kw_only=True)
class UpdateRoom(Mutation):
    room_id: int
    title: str
    command: ClassVar[str] = "update_room"

    async def apply(self, tx: Tx) -> dict[str, Any]:
        room = await tx.member_room(self.room_id, self.user_id)
        rules.check_update(room["kind"], room["role"])
        await tx.conn.execute("UPDATE rooms SET title = %s WHERE id = %s", (self.title, self.room_id))
        event = await tx.append(room, "room_updated", self.user_id, {"title": self.title})
        return {"seq": event.seq}
