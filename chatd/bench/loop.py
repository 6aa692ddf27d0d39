"""The loader's per-connection state, its full-mode frame handling and its send schedules."""

from __future__ import annotations

import time

from chatd.bench import stats, wire

CONNECTING, UPGRADING, HELLO, READY, CLOSED = range(5)
MAX_HANDSHAKE = 16384
mono = time.monotonic_ns


class Conn:
    """One client WebSocket. Kept small: a loader holds thousands."""

    __slots__ = ("idx", "user", "src", "sock", "fd", "state", "full", "sampled", "buf", "tail", "wbuf", "t0", "token")

    def __init__(self, idx: int, user: str, src: str) -> None:
        self.idx, self.user, self.src = idx, user, src
        self.sock = None
        self.fd = -1
        self.state = CONNECTING
        self.full = True  # parse every frame (handshake, senders); False: only count stamps
        self.sampled = True  # record latencies of the deliveries it receives
        self.buf = b""
        self.tail = b""
        self.wbuf = b""
        self.t0 = 0
        self.token: str | None = None


def send_one(loader, conn: Conn, room_id: int) -> None:
    rid = next(loader.rids)
    now = mono()
    loader.pending[rid] = (conn, now, "send", room_id)
    loader.sent += 1
    loader.write(conn, loader.dialect.send(rid, room_id, wire.body(now)))


class Sending:
    """One load step's sends: ``rate`` (open loop, msgs/s spread round-robin over the
    senders) or ``closed`` (each sender keeps ``window`` sends in flight: as fast as acks allow).
    """

    def __init__(self, senders: list, mode: str, rate: float, duration: float, window: int, max_pending: int) -> None:
        self.senders = senders
        self.mode = mode
        self.rate = rate
        self.duration = int(duration * 1e9)
        self.window = window
        self.max_pending = max_pending
        self.start: int | None = None
        self.end = 0
        self.count = 0
        self.next_i = 0

    def tick(self, loader, now: int) -> float:
        if self.start is None:
            self.start, self.end = now, now + self.duration
            if self.mode == "closed":
                for conn, room_id in self.senders:
                    for _ in range(self.window):
                        if conn.state == READY:
                            send_one(loader, conn, room_id)
        if now >= self.end:
            loader.sending = None
            loader.emit({"ev": "step_done", "sent": loader.sent, "skipped": loader.skipped})
            return 0.05
        if self.mode != "rate" or not self.senders or self.rate <= 0:
            return min(0.05, (self.end - now) / 1e9)
        due = int((now - self.start) * self.rate / 1e9) - self.count
        senders = self.senders
        for _ in range(min(due, 5000)):
            conn, room_id = senders[self.next_i]
            self.next_i = (self.next_i + 1) % len(senders)
            self.count += 1
            if conn.state != READY or len(loader.pending) >= self.max_pending:
                loader.skipped += 1
                continue
            send_one(loader, conn, room_id)
        wait = (self.start + (self.count + 1) * 1e9 / self.rate - now) / 1e9
        return min(0.05, max(0.0, wait))

    def on_ack(self, loader, conn: Conn, room_id: int) -> None:
        if self.mode == "closed" and conn.state == READY:
            send_one(loader, conn, room_id)


def on_full_read(loader, conn: Conn, data: bytes) -> None:
    """Handle bytes for a connection in full mode: upgrade response, then every frame."""
    if conn.state == UPGRADING:
        buf = conn.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            conn.buf = buf
            if len(buf) > MAX_HANDSHAKE:
                loader.connect_failed(conn, "upgrade: response too long")
            return
        status = buf[: buf.find(b"\r\n")]
        if not status.startswith(b"HTTP/1.1 101"):
            loader.connect_failed(conn, f"upgrade: {status.decode('latin-1')[:60]}")
            return
        conn.state = HELLO
        conn.buf = b""
        data = buf[end + 4 :]
        rid = next(loader.rids)
        first = loader.dialect.on_open(conn.token, rid)
        if first:
            loader.pending[rid] = (conn, mono(), "hello", None)
            loader.write(conn, first)
    frames, conn.buf = wire.parse_frames(conn.buf + data if conn.buf else data)
    dialect = loader.dialect
    mark = loader.mark
    live = dialect.live_event
    for op, payload in frames:
        if mark in payload and live(payload):
            loader.deliveries += 1
            if conn.sampled:
                for digits in loader.stamp.findall(payload):
                    us = (mono() - int(digits)) // 1000
                    loader.lat[stats.bucket(us)] += 1
                    loader.lat_max = max(loader.lat_max, us)
            continue
        if op == wire.OP_CLOSE:
            loader.lost(conn, wire.close_code(payload))
            return
        got = dialect.reply(op, payload)
        if got is None:
            continue
        kind, rid, body = got
        if kind == "ping":
            loader.write(conn, dialect.pong(body))
        elif kind == "eio_ping":
            loader.write(conn, dialect.eio_pong())
        elif kind == "eio_open":
            loader.write(conn, dialect.connect_packet(conn.token))
        elif rid == "connect":
            if kind == "ok":
                loader.connect_done(conn)
            else:
                loader.connect_failed(conn, f"connect: {body}")
                return
        else:
            _on_reply(loader, conn, kind, rid, body)


def _on_reply(loader, conn: Conn, kind: str, rid, body) -> None:
    entry = loader.pending.pop(rid, None)
    if entry is None:
        return
    _, sent_at, what, extra = entry
    us = (mono() - sent_at) // 1000
    if what == "send":
        if kind == "ok":
            loader.acked += 1
            loader.ack[stats.bucket(us)] += 1
            loader.ack_max = max(loader.ack_max, us)
            if loader.mixing is not None:
                loader.mixing.on_ack(extra, body)
        else:
            loader.errors[f"send: {body}"] += 1
        if loader.sending is not None:
            loader.sending.on_ack(loader, conn, extra)
    elif what == "hello":
        if kind == "ok":
            loader.connect_done(conn)
        else:
            loader.connect_failed(conn, f"hello: {body}")
    elif what == "call":
        loader.call_result(extra, kind, body)
    elif what == "cmd":
        if kind != "ok":
            loader.errors[f"{body}"] += 1
    elif what == "sync":
        if kind == "ok":
            loader.sync_h[stats.bucket(us)] += 1
            loader.sync_max = max(loader.sync_max, us)
        else:
            loader.errors[f"sync: {body}"] += 1
    elif what == "probe":
        loader.probe_h[stats.bucket(us)] += 1
        loader.probe_max = max(loader.probe_max, us)
        if loader.probe is not None:
            loader.probe["rid"] = None
