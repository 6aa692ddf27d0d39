"""Per-room positions of a client's event stream (sans-IO: no trio, no sockets).

The :class:`Timeline` remembers, per room, the last seq handed to the caller and
decides what each incoming durable event is: already seen (dedupe by
``(room_id, seq)``), the next one, or past a gap that must be fetched first
(docs/protocol.md §9). It also turns one ``sync`` result into the items to hand
out and says whether another ``sync`` round is needed.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = ["Timeline", "Verdict"]


class Verdict(enum.Enum):
    DUPLICATE = "duplicate"  # seq <= last held: drop it
    NEXT = "next"  # seq == last held + 1: hand it out
    GAP = "gap"  # seq > last held + 1: fetch what is between first
    OTHER = "other"  # not a durable event (ephemeral frame, or no usable room_id/seq)


def _room_and_seq(frame: dict[str, Any]) -> tuple[int, int] | None:
    if frame.get("type") != "event":
        return None
    room_id, seq = frame.get("room_id"), frame.get("seq")
    if type(room_id) is not int or type(seq) is not int:
        return None
    return room_id, seq


class Timeline:
    """Last seq handed out per room.

    ``positions`` seeds it (``{room_id: seq}``, e.g. saved from an earlier run); None
    means "not seeded": the first welcome then seeds it with each room's ``last_seq``
    (start from now). A room it does not know counts as position 0, so its first event
    is fetched from the start of what the user may see.
    """

    def __init__(self, positions: dict[int, int] | None = None) -> None:
        self._seqs: dict[int, int] = {int(k): int(v) for k, v in (positions or {}).items()}
        self.seeded = positions is not None

    def positions(self) -> dict[int, int]:
        """A copy of ``{room_id: last seq handed out}``."""
        return dict(self._seqs)

    def position(self, room_id: int) -> int:
        return self._seqs.get(room_id, 0)

    def seed_from_welcome(self, welcome: dict[str, Any]) -> None:
        """Start every room of ``welcome`` at its current ``last_seq`` (nothing old is replayed)."""
        for room in welcome.get("rooms") or ():
            self._seqs[room["room_id"]] = room["last_seq"]
        self.seeded = True

    def classify(self, frame: dict[str, Any]) -> Verdict:
        key = _room_and_seq(frame)
        if key is None:
            return Verdict.OTHER
        last = self._seqs.get(key[0], 0)
        if key[1] <= last:
            return Verdict.DUPLICATE
        return Verdict.NEXT if key[1] == last + 1 else Verdict.GAP

    def advance(self, frame: dict[str, Any]) -> None:
        """Record that ``frame`` (a durable event) was handed out."""
        key = _room_and_seq(frame)
        if key is not None and key[1] > self._seqs.get(key[0], 0):
            self._seqs[key[0]] = key[1]

    def accept_page(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events of one history/sync page not handed out yet; advances past them."""
        fresh = []
        for event in events:
            if self.classify(event) in (Verdict.NEXT, Verdict.GAP):
                fresh.append(event)
                self.advance(event)
        return fresh

    def apply_sync(self, result: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """Apply one ``sync`` result; returns (items to hand out, whether to sync again).

        Items are new events (ascending per room), ``{"type": "snapshot", "room_id",
        "snapshot"}`` for rooms too far behind (the position jumps to
        ``snapshot.last_seq``) and ``{"type": "removed", "room_id"}`` for rooms the user
        left or lost. Rooms in ``added`` start at ``joined_seq - 1``; they and rooms
        with ``has_more`` need another round.
        """
        items: list[dict[str, Any]] = []
        again = False
        for room in result.get("rooms") or ():
            room_id = room["room_id"]
            if room.get("too_far_behind"):
                snapshot = room.get("snapshot") or {}
                items.append({"type": "snapshot", "room_id": room_id, "snapshot": snapshot})
                self._seqs[room_id] = int(snapshot.get("last_seq", self.position(room_id)))
                continue
            fresh = self.accept_page(room.get("events") or [])
            items.extend(fresh)
            again = again or bool(room.get("has_more") and fresh)
        for room_id in result.get("removed") or ():
            if self._seqs.pop(room_id, None) is not None:
                items.append({"type": "removed", "room_id": room_id})
        for summary in result.get("added") or ():
            room_id = summary["room_id"]
            if room_id not in self._seqs:
                self._seqs[room_id] = max(int(summary.get("joined_seq") or 1) - 1, 0)
                again = True
        return items, again
