"""The loader's side of the ``mixed`` scenario: sends, typing and presence churn on
schedules, and a reconnect-and-sync storm of some clients half-way through the step.

A reconnecting client drops its socket without a close frame (a network drop),
connects again as the same user and sends ``sync`` for its room from a little behind
the last seq its loader saw acked, as a real client resuming would.
"""

from __future__ import annotations

import time

from chatd.bench.loop import READY, send_one

mono = time.monotonic_ns


class Mixing:
    def __init__(self, loader, cmd: dict) -> None:
        self.senders = [(loader.conns[i], room) for i, room in cmd["senders"]]
        self.room_of = {i: room for i, room in cmd["senders"]}
        self.rates = {"send": cmd["msg_rate"], "typing": cmd["typing_rate"], "presence": cmd["presence_rate"]}
        self.counts = dict.fromkeys(self.rates, 0)
        self.turn = dict.fromkeys(self.rates, 0)
        self.duration = int(cmd["duration"] * 1e9)
        self.storm = set(cmd["storm"])
        self.storm_at = int(cmd["storm_at"] * 1e9)
        self.behind = cmd.get("behind", 20)
        self.stormed = False
        self.start: int | None = None
        self.last_seq: dict[int, int] = {}
        self.away: set[int] = set()
        self.typing = self.presence = self.reconnects = 0

    def tick(self, loader, now: int) -> float:
        if self.start is None:
            self.start = now
        elapsed = now - self.start
        if elapsed >= self.duration:
            loader.mixing = None
            loader.emit({"ev": "step_done", "sent": loader.sent, "typing": self.typing, "presence": self.presence,
                         "reconnects": self.reconnects})
            return 0.05
        if not self.stormed and elapsed >= self.storm_at:
            self.stormed = True
            for idx in sorted(self.storm):
                loader.reconnect(idx)
                self.reconnects += 1
        for kind, rate in self.rates.items():
            due = int(elapsed * rate / 1e9) - self.counts[kind]
            for _ in range(min(due, 2000)):
                self.counts[kind] += 1
                i = self.turn[kind]
                self.turn[kind] = (i + 1) % len(self.senders)
                conn = loader.conns[self.senders[i][0].idx]  # the current connection of that slot
                if conn.state == READY:
                    self.act(loader, kind, conn, self.senders[i][1])
                else:
                    loader.skipped += 1
        return 0.002

    def act(self, loader, kind: str, conn, room_id: int) -> None:
        dialect = loader.dialect
        if kind == "send":
            send_one(loader, conn, room_id)
        elif kind == "typing":
            self.typing += 1
            loader.request(conn, lambda rid: dialect.command(rid, {"type": "typing", "room_id": room_id, "active": True}), "cmd")
        else:
            self.presence += 1
            status = "online" if conn.idx in self.away else "away"
            (self.away.discard if status == "online" else self.away.add)(conn.idx)
            loader.request(conn, lambda rid: dialect.command(rid, {"type": "set_presence", "status": status}), "cmd")

    def on_ack(self, room_id: int, body) -> None:
        seq = body.get("seq") if isinstance(body, dict) else None
        if isinstance(seq, int) and seq > self.last_seq.get(room_id, 0):
            self.last_seq[room_id] = seq

    def on_ready(self, loader, conn) -> None:
        """A storm client is back: resume its room from a little behind."""
        room_id = self.room_of.get(conn.idx)
        if conn.idx not in self.storm or room_id is None:
            return
        since = max(0, self.last_seq.get(room_id, 0) - self.behind)
        loader.request(conn, lambda rid: loader.dialect.command(rid, {"type": "sync", "rooms": {room_id: since}}), "sync")
