"""Presence: one status per user, aggregated over all the user's connections.

A user is ``offline`` with no connection or if any connection is ``invisible``;
otherwise ``online`` if any connection says online, else ``away``. Changes are
collected and sent every ``window`` seconds as one ``presence`` frame per
watcher holding only what changed (coalesced: a flap inside one window that
ends where it started sends nothing). Watchers of a user are the sessions of
users sharing a DM with them and the sessions that subscribed to them.
Read receipts are coalesced the same way, per (room, user).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

import trio

from chatd.registry.rooms import Rooms
from chatd.registry.sessions import Session

Encode = Callable[[dict], bytes]
# Frames one part of a flush sends before the loop serves others (~10 µs each).
FLUSH_CHUNK = 256
_NO_PEERS: frozenset[str] = frozenset()


def aggregate(statuses: Iterable[str]) -> str:
    seen = set(statuses)
    if "invisible" in seen:
        return "offline"  # one invisible device hides the user everywhere
    if "online" in seen:
        return "online"
    if "away" in seen:
        return "away"
    return "offline"


class Presence:
    def __init__(self, rooms: Rooms, encode: Encode, *, window: float, clock: Callable[[], float] = time.time) -> None:
        self.rooms = rooms
        self.encode = encode
        self.window = window
        self.clock = clock
        self.status: dict[str, str] = {}
        self.last_seen: dict[str, float] = {}
        self.peers: dict[str, set[str] | frozenset[str]] = {}
        self.subscribers: dict[str, set[Session]] = {}
        self._sent: dict[str, str] = {}       # what watchers were last told, per user
        self._changed: set[str] = set()
        self._receipts: dict[tuple[int, str], tuple[int, Session | None]] = {}
        self._wake = trio.Event()

    # --- state changes --------------------------------------------------------------

    def info(self, user_id: str) -> dict[str, Any]:
        status = self.status.get(user_id, "offline")
        out: dict[str, Any] = {"user_id": user_id, "status": status}
        if status == "offline" and user_id in self.last_seen:
            out["last_seen"] = self.last_seen[user_id]
        return out

    def recompute(self, user_id: str) -> bool:
        """Re-aggregate a user's status from their sessions; True if it changed."""
        new = aggregate(s.status for s in self.rooms.sessions_of(user_id))
        old = self.status.get(user_id, "offline")
        if new == old:
            return False
        if new == "offline":
            self.status.pop(user_id, None)
            self.last_seen[user_id] = self.clock()
        else:
            self.status[user_id] = new
        self._changed.add(user_id)
        self._wake.set()
        return True

    def set_peers(self, user_id: str, peers: Iterable[str]) -> None:
        # Most users have no DM: they share one empty frozenset, not a set each.
        self.peers[user_id] = set(peers) or _NO_PEERS

    def add_peers(self, a: str, b: str) -> None:
        """A DM between a and b now exists: each watches the other."""
        for user, peer in ((a, b), (b, a)):
            known = self.peers.get(user)
            if known is _NO_PEERS:
                self.peers[user] = {peer}
            elif known is not None:
                known.add(peer)

    def forget(self, user_id: str) -> None:
        """The user's last session is gone and watchers were told: drop caches."""
        self.peers.pop(user_id, None)

    def subscribe(self, session: Session, users: Iterable[str]) -> None:
        if not session.watching:
            session.watching = set()
        for user in users:
            session.watching.add(user)
            self.subscribers.setdefault(user, set()).add(session)

    def unsubscribe(self, session: Session, users: Iterable[str] | None = None) -> None:
        if not session.watching:
            return
        for user in list(session.watching if users is None else users):
            session.watching.discard(user)
            subs = self.subscribers.get(user)
            if subs is not None:
                subs.discard(session)
                if not subs:
                    del self.subscribers[user]

    def note_receipt(self, room_id: int, user_id: str, read_seq: int, origin: Session | None = None) -> None:
        """Queue a receipt for the room's other members and the user's other connections."""
        key = (room_id, user_id)
        if read_seq > self._receipts.get(key, (-1, None))[0]:
            self._receipts[key] = (read_seq, origin)
            self._wake.set()

    # --- sending --------------------------------------------------------------------

    def watchers(self, user_id: str) -> set[Session]:
        out = set(self.subscribers.get(user_id, ()))
        # A user's DM peers are loaded when their first session opens and kept
        # until the flush after their last one closes: always there when their
        # status changes. DMs are symmetric, so these are exactly the watchers.
        for peer in self.peers.get(user_id, ()):
            out.update(self.rooms.sessions_of(peer))
        return out

    def flush_in_parts(self) -> Iterator[None]:
        """Send what changed since the last flush, yielding after every FLUSH_CHUNK frames.

        After a reconnect storm one flush is a frame for each of thousands of watching
        sessions (an encode and a ``send`` each, ~10 µs); :meth:`serve` checkpoints at each
        yield so the other connections are served between the parts. A session gets at
        most one ``presence`` frame per flush, so the order of its frames is unchanged.
        """
        changed, self._changed = self._changed, set()
        per_session: dict[Session, list[dict[str, Any]]] = {}
        for user in changed:
            current = self.status.get(user, "offline")
            if self._sent.get(user, "offline") == current and current != "offline":
                continue
            if current == "offline" and user not in self._sent:
                continue  # went up and down inside one window: nobody saw it
            if current == "offline":
                self._sent.pop(user, None)
            else:
                self._sent[user] = current
            info = self.info(user)
            for session in self.watchers(user):
                if session.user_id != user:
                    per_session.setdefault(session, []).append(info)
            if current == "offline" and not self.rooms.sessions_of(user):
                self.forget(user)
        receipts, self._receipts = self._receipts, {}
        sent = 0
        for session, infos in per_session.items():
            session.deliver(self.encode({"type": "presence", "users": infos}))
            sent += 1
            if sent % FLUSH_CHUNK == 0:
                yield
        for (room_id, user_id), (read_seq, origin) in receipts.items():
            frame = self.encode({"type": "receipt", "room_id": room_id, "user_id": user_id, "read_seq": read_seq})
            self.rooms.broadcast(room_id, frame, skip_session=origin)
            sent += 1
            if sent % FLUSH_CHUNK == 0:
                yield

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.window)
            for _ in self.flush_in_parts():
                await trio.lowlevel.checkpoint()
