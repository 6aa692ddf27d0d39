"""Plain chat types shared by store, service and registry. No I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("member", "admin", "owner")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}


@dataclass(slots=True)
class RoomEvent:
    """One committed entry of a room's log (what clients receive as an `event`)."""

    room_id: int
    seq: int
    kind: str
    sender: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)

    def wire(self) -> dict[str, Any]:
        return {
            "type": "event",
            "room_id": self.room_id,
            "seq": self.seq,
            "kind": self.kind,
            "sender": self.sender,
            "at": self.at,
            "data": self.data,
        }


@dataclass(slots=True)
class Room:
    id: int
    kind: str  # "dm" | "group"
    title: str
    public: bool
    created_by: str
    created_at: float
    last_seq: int

    def wire(self) -> dict[str, Any]:
        return {
            "room_id": self.id,
            "kind": self.kind,
            "title": self.title,
            "public": self.public,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "last_seq": self.last_seq,
        }


@dataclass(slots=True)
class Member:
    room_id: int
    user_id: str
    role: str
    joined_seq: int
    read_seq: int = 0


def dm_key(a: str, b: str) -> str:
    """The one key of the DM between two users, whatever the order they are named in."""
    low, high = sorted((a, b))
    return f"{low}\x1f{high}"
