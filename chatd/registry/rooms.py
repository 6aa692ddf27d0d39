"""Room fan-out: which local sessions receive a room's events.

Each event is encoded to ONE WebSocket frame and the same bytes are handed to
every recipient's outbox with a non-blocking ``deliver`` (DESIGN.md §3.5): no
await and no task wake-up per recipient. Membership events update who receives:
a joining member receives their own ``member_joined``; a leaving or removed
member receives their ``member_left`` and nothing after it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Mapping, Sequence

from chatd.domain.model import RoomEvent
from chatd.registry.sessions import Session

Encode = Callable[[dict], bytes]

# How many recent publishes ``changed_since`` can look back over; a session that
# took longer than this many publishes to open re-reads its rooms.
RECENT_PUBLISHES = 1024


class Rooms:
    def __init__(self, encode: Encode) -> None:
        self.encode = encode
        self.by_user: dict[str, list[Session]] = {}
        self.members: dict[int, set[Session]] = {}
        self.deliveries = 0
        self.slow_consumers = 0
        # One entry per publish: (highest seq per room, users whose membership changed).
        self.generation = 0
        self._recent: deque[tuple[dict[int, int], set[str]]] = deque(maxlen=RECENT_PUBLISHES)

    # --- sessions -------------------------------------------------------------------

    def attach(self, session: Session, room_ids: Iterable[int]) -> bool:
        """Register a session and its rooms; True if it is the user's first session."""
        sessions = self.by_user.setdefault(session.user_id, [])
        sessions.append(session)
        for room_id in room_ids:
            self.enter(session, room_id)
        return len(sessions) == 1

    def detach(self, session: Session) -> bool:
        """Forget a session; True if it was the user's last one."""
        for room_id in session.rooms:
            members = self.members.get(room_id)
            if members is not None:
                members.discard(session)
                if not members:
                    del self.members[room_id]
        session.rooms.clear()
        sessions = self.by_user.get(session.user_id, [])
        if session in sessions:
            sessions.remove(session)
        if not sessions:
            self.by_user.pop(session.user_id, None)
            return True
        return False

    def changed_since(self, generation: int, user_id: str, last_seqs: Mapping[int, int]) -> bool:
        """Did a publish after ``generation`` concern a session opening from a read?

        True when an event past ``last_seqs`` (room -> last seq the read saw) or a
        membership change of ``user_id`` went out, or when too much was published
        to tell: the session may have missed it and must read again (now attached).
        """
        behind = self.generation - generation
        if behind == 0:
            return False
        if behind > len(self._recent):
            return True
        for i in range(len(self._recent) - behind, len(self._recent)):
            seqs, movers = self._recent[i]
            if user_id in movers:
                return True
            for room_id, seq in seqs.items():
                if seq > last_seqs.get(room_id, seq):
                    return True
        return False

    def sessions_of(self, user_id: str) -> list[Session]:
        return self.by_user.get(user_id, [])

    def enter(self, session: Session, room_id: int) -> None:
        session.rooms.add(room_id)
        self.members.setdefault(room_id, set()).add(session)

    def leave(self, session: Session, room_id: int) -> None:
        session.rooms.discard(room_id)
        members = self.members.get(room_id)
        if members is not None:
            members.discard(session)
            if not members:
                del self.members[room_id]

    # --- fan-out --------------------------------------------------------------------

    def broadcast(self, room_id: int, frame: bytes, *, skip_user: str | None = None, skip_session: Session | None = None) -> int:
        """Hand ``frame`` to every local session in the room. Never waits."""
        members = self.members.get(room_id)
        if not members:
            return 0
        refused = 0
        if skip_user is None and skip_session is None:
            sent = len(members)
            for session in members:  # deliver never changes room membership
                if session.deliver(frame) is False:
                    refused += 1
        else:
            sent = 0
            for session in members:
                if session.user_id != skip_user and session is not skip_session:
                    sent += 1
                    if session.deliver(frame) is False:
                        refused += 1
        self.deliveries += sent
        self.slow_consumers += refused
        return sent

    def publish(self, events: Sequence[RoomEvent]) -> None:
        """Fan out committed events (sorted by room, then seq).

        Consecutive events of one room are handed to each recipient as ONE
        write while the set of recipients stays the same: WebSocket frames are
        self-delimiting, so their concatenation is what the socket would carry
        anyway, at one syscall per recipient instead of one per event. A join
        of someone not yet receiving ends the run before it; a leave ends it
        after itself (the leaver receives their own member_left, nothing more).
        """
        run: list[bytes] = []
        run_room = 0
        seqs: dict[int, int] = {}
        movers: set[str] = set()
        self._recent.append((seqs, movers))
        self.generation += 1
        for i, event in enumerate(events):
            room_id = event.room_id
            seqs[room_id] = event.seq
            if run and room_id != run_room:
                self._broadcast_run(run_room, run)
                run = []
            kind = event.kind
            if kind == "member_joined" or kind == "member_left":
                movers.add(event.data["user_id"])
            if kind == "room_created":
                # Members added at creation see the room from seq 1: their joins
                # follow in the same batch (creation is one mutation).
                for later in events[i + 1:]:
                    if later.room_id != room_id:
                        break
                    if later.kind == "member_joined":
                        self._enter_user(later.data["user_id"], room_id)
            elif kind == "member_joined" and self._outside(event.data["user_id"], room_id):
                if run:
                    self._broadcast_run(run_room, run)
                    run = []
                self._enter_user(event.data["user_id"], room_id)
            run_room = room_id
            run.append(self.encode(event.wire()))
            if kind == "member_left":
                self._broadcast_run(room_id, run)
                run = []
                for session in self.sessions_of(event.data["user_id"]):
                    self.leave(session, room_id)
        if run:
            self._broadcast_run(run_room, run)

    def _outside(self, user_id: str, room_id: int) -> bool:
        return any(room_id not in s.rooms for s in self.sessions_of(user_id))

    def _enter_user(self, user_id: str, room_id: int) -> None:
        for session in self.sessions_of(user_id):
            self.enter(session, room_id)

    def _broadcast_run(self, room_id: int, frames: list[bytes]) -> None:
        if len(frames) == 1:
            self.broadcast(room_id, frames[0])
            return
        sent = self.broadcast(room_id, b"".join(frames))
        self.deliveries += sent * (len(frames) - 1)  # count events, not writes

