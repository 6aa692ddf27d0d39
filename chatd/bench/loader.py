"""A load process: ``python -m chatd.bench.loader --proto chatd|sio --port P ...``.

One thread, one epoll, thousands of client WebSockets; no framework in the hot path
(a loader that saturates before the server makes the numbers meaningless). It is
driven by JSON lines on stdin (``op``) and answers with JSON lines on stdout (``ev``);
see ``chatd/bench/fleet.py`` for the orchestrator's side.

Connections start in *full* mode (every frame parsed: handshake, replies, acks). Once
set up, pure receivers switch to *fast* mode: a socket read is only searched for the
message stamp (``wire.MARKS``), counted, and - on sampled connections - the send
timestamps pulled out, so receiving costs a fraction of a microsecond per delivery.
The process exits by itself at ``--max-seconds`` or when stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import select
import socket
import sys
import time

from chatd.bench import stats, wire
from chatd.bench.loop import CLOSED, CONNECTING, READY, UPGRADING, Conn, Sending, on_full_read
from chatd.bench.connector import Connector
from chatd.bench.mixing import Mixing

IN, OUT = select.EPOLLIN, select.EPOLLOUT
mono = time.monotonic_ns
# Under load, a wake-up per readable socket costs the loader (and, on two cores, the
# server) more than the reads: once a loader sees over BUSY_EVENTS readable sockets per
# 100 ms it waits BATCH_S after a wake-up that found few, so one epoll pass collects many.
# That adds at most 0.5 ms to latencies measured at those rates (docs/performance.md).
BATCH_S = 0.0005
BUSY_EVENTS = 500


class Loader(Connector):
    def __init__(self, args: argparse.Namespace) -> None:
        self.host, self.port = args.host, args.port
        self.masker = wire.Masker()
        self.dialect = wire.dialect(args.proto, self.masker)
        self.path = self.dialect.path(args.path)
        self.is_sio = args.proto == "sio"
        self.mark = wire.MARKS[args.proto]
        self.stamp = wire.STAMPS[args.proto]
        self.stamp_len = wire.STAMP_LENS[args.proto]
        self.secret = args.secret
        self.deadline = mono() + int(args.max_seconds * 1e9)
        self.ep = select.epoll()
        self.ctl = sys.stdin.buffer.raw
        self.ep.register(self.ctl.fileno(), IN)
        self.ctl_buf = b""
        self.conns: list[Conn] = []
        self.by_fd: dict[int, Conn] = {}
        self.rids = iter(range(1, 1 << 62))
        self.pending: dict[int, tuple] = {}  # rid -> (conn, t_ns, kind, extra)
        self.queue: collections.deque[Conn] = collections.deque()
        self.connecting = 0
        self.concurrency = 256
        self.connect_started = 0
        self.connect_wanted = 0
        self.calls: list | None = None
        self.calls_left = 0
        self.sending: Sending | None = None
        self.mixing: Mixing | None = None
        self.probe: dict | None = None
        self.running = True
        self.ready = 0  # connections past the handshake and still open
        self.rx = 0  # bytes received, cumulative: the orchestrator waits for it to settle
        self.reset()

    # --- counters, reported and reset by the "report" op ----------------------------------

    def reset(self) -> None:
        self.sent = self.acked = self.skipped = self.deliveries = self.failed = 0
        self.lat, self.ack, self.probe_h, self.connect_h = stats.new(), stats.new(), stats.new(), stats.new()
        self.sync_h = stats.new()
        self.lat_max = self.ack_max = self.probe_max = self.sync_max = 0
        self.dropped = 0  # requests whose connection the storm dropped before the reply
        self.errors: collections.Counter = collections.Counter()
        self.closes: collections.Counter = collections.Counter()

    def report(self) -> dict:
        out = {
            "ev": "report", "sent": self.sent, "acked": self.acked, "skipped": self.skipped,
            "deliveries": self.deliveries, "failed": self.failed, "pending": len(self.pending),
            "lat": stats.sparse(self.lat), "lat_max": self.lat_max,
            "ack": stats.sparse(self.ack), "ack_max": self.ack_max,
            "probe": stats.sparse(self.probe_h), "probe_max": self.probe_max, "probe_waiting_us": self.probe_waiting_us(),
            "connect": stats.sparse(self.connect_h),
            "sync": stats.sparse(self.sync_h), "sync_max": self.sync_max, "dropped": self.dropped,
            "errors": dict(self.errors), "closes": {str(k): v for k, v in self.closes.items()},
            "open": self.ready,
        }
        self.reset()
        return out

    def probe_waiting_us(self) -> int:
        """How long the probe's unanswered ping has waited (0 if none): a server that
        answers nothing in a window must not look responsive for lack of samples."""
        rid = self.probe["rid"] if self.probe is not None else None
        entry = self.pending.get(rid) if rid is not None else None
        return (mono() - entry[1]) // 1000 if entry is not None else 0

    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        poll = self.ep.poll
        by_fd = self.by_fd
        ctl_fd = self.ctl.fileno()
        window, seen, busy = mono(), 0, False
        while self.running:
            now = mono()
            if now > self.deadline:
                self.emit({"ev": "fatal", "error": "loader deadline passed"})
                break
            if now - window > 100_000_000:
                window, busy, seen = now, seen > BUSY_EVENTS, 0
            timeout = self.tick(now)
            events = poll(timeout, 4096)
            if busy and 0 < len(events) < 64:
                time.sleep(BATCH_S)
                events = poll(0, 4096)
            seen += len(events)
            for fd, ev in events:
                if fd == ctl_fd:
                    self.read_control()
                    continue
                conn = by_fd.get(fd)
                if conn is None:
                    continue
                if ev & OUT:
                    self.on_writable(conn)
                if ev & ~OUT and conn.state != CLOSED:
                    self.on_readable(conn)
        for conn in self.conns:
            if conn.sock is not None:
                conn.sock.close()

    def tick(self, now: int) -> float:
        timeout = 0.05
        while self.queue and self.connecting < self.concurrency:
            self.start_connect(self.queue.popleft(), now)
        if self.connecting and now - self.connect_started > 1_000_000_000:
            self.expire_connects(now)
        if self.connect_wanted and not self.connecting and not self.queue:
            self.connect_wanted = 0
            self.emit({"ev": "connected", "open": self.ready, "failed": self.failed})
        if self.sending is not None:
            timeout = min(timeout, self.sending.tick(self, now))
        if self.mixing is not None:
            timeout = min(timeout, self.mixing.tick(self, now))
        if self.probe is not None:
            timeout = min(timeout, self.probe_tick(now))
        return timeout

    # --- control ----------------------------------------------------------------------------

    def read_control(self) -> None:
        data = self.ctl.read(65536)
        if not data:
            self.running = False
            return
        self.ctl_buf += data
        while b"\n" in self.ctl_buf:
            line, self.ctl_buf = self.ctl_buf.split(b"\n", 1)
            if line.strip():
                self.command(json.loads(line))

    def command(self, cmd: dict) -> None:
        op = cmd["op"]
        if op == "connect":
            self.connect(cmd["users"], cmd["src"], cmd.get("concurrency", 256), cmd.get("ttl", 7200))
        elif op == "calls":
            self.start_calls(cmd["calls"])
        elif op == "fast":
            keep = set(cmd.get("except", ()))
            sample = cmd.get("sample_every", 1)
            for conn in self.conns:
                conn.sampled = conn.idx % sample == 0
                if conn.idx not in keep and conn.state == READY:
                    conn.full = False
                    conn.tail = conn.buf[-wire.TAIL:]
                    conn.buf = b""
        elif op == "step":
            senders = [(self.conns[i], room) for i, room in cmd["senders"]]
            self.sending = Sending(senders, cmd["mode"], cmd.get("rate", 0.0), cmd["duration"], cmd.get("window", 1), cmd.get("max_pending", 50_000))
        elif op == "mixed":
            self.mixing = Mixing(self, cmd)
        elif op == "probe":
            self.probe = {"conn": self.conns[cmd["idx"]], "interval": int(cmd["interval"] * 1e9), "next": 0, "rid": None} if cmd["on"] else None
        elif op == "stats":
            self.emit({"ev": "stats", "sent": self.sent, "acked": self.acked, "deliveries": self.deliveries,
                       "pending": len(self.pending), "sending": self.sending is not None or self.mixing is not None, "open": self.ready,
                       "connecting": self.connecting + len(self.queue), "rx": self.rx})
        elif op == "report":
            self.emit(self.report())
        elif op == "drop":  # every open connection but ``keep`` closes at once, without a close frame
            keep = set(cmd.get("keep", ()))
            gone = [conn for conn in self.conns if conn.idx not in keep and conn.state == READY]
            for conn in gone:
                self.drop(conn)
            self.emit({"ev": "dropped", "count": len(gone)})
        elif op == "quit":
            self.running = False
        else:
            self.emit({"ev": "fatal", "error": f"unknown op {op}"})

    # --- writing ----------------------------------------------------------------------------

    def write(self, conn: Conn, data: bytes) -> None:
        if conn.sock is None:
            return
        if conn.wbuf:
            conn.wbuf += data
            return
        n = self._send(conn, data)
        if n is not None and n < len(data):
            conn.wbuf = data[n:]
            self.ep.modify(conn.fd, IN | OUT)

    def _send(self, conn: Conn, data: bytes) -> int | None:
        """One non-blocking send: bytes taken, or None after the connection was lost."""
        try:
            return conn.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.lost(conn, None)
            return None

    def on_writable(self, conn: Conn) -> None:
        if conn.state == CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.connect_failed(conn, f"connect: {errno.errorcode.get(err, err)}")
                return
            conn.state = UPGRADING
            self.ep.modify(conn.fd, IN)
            self.write(conn, wire.upgrade_request(self.host, self.port, self.path))
            return
        data, conn.wbuf = conn.wbuf, b""
        if not data:
            self.ep.modify(conn.fd, IN)
            return
        n = self._send(conn, data)
        if n is None:
            return
        conn.wbuf = data[n:]
        if not conn.wbuf:
            self.ep.modify(conn.fd, IN)

    def request(self, conn: Conn, frame_of, kind: str, extra=None) -> int:
        rid = next(self.rids)
        self.pending[rid] = (conn, mono(), kind, extra)
        self.write(conn, frame_of(rid))
        return rid

    # --- reading ----------------------------------------------------------------------------

    def on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            self.lost(conn, None)
            return
        if self.probe is None or conn is not self.probe["conn"]:
            self.rx += len(data)  # the probe's pings would never let a run look settled
        if not data:
            self.lost(conn, wire.find_close(conn.tail if not conn.full else conn.buf[-wire.TAIL:]))
            return
        if not conn.full:
            tail = conn.tail
            buf = tail + data if tail else data
            start = len(tail)
            n = buf.count(self.mark, max(0, start - len(self.mark) + 1))
            if n:
                self.deliveries += n
                if conn.sampled:
                    now = mono()
                    lat = self.lat
                    top = self.lat_max
                    for digits in self.stamp.findall(buf, max(0, start - self.stamp_len + 1)):
                        us = (now - int(digits)) // 1000
                        if us < 256:
                            lat[us if us > 0 else 0] += 1
                        else:
                            shift = us.bit_length() - 8
                            lat[(shift << 7) + (us >> shift)] += 1
                            if us > top:
                                top = us
                    self.lat_max = top
            if self.is_sio:
                for _ in range(buf.count(wire.EIO_PING, max(0, start - 2))):
                    self.write(conn, self.dialect.eio_pong())
            conn.tail = buf[-wire.TAIL:]
            return
        on_full_read(self, conn, data)

    def lost(self, conn: Conn, code: int | None) -> None:
        if conn.state == CLOSED:
            return
        if conn.state < READY:
            self.connect_failed(conn, "closed during handshake")
            return
        self.closes[code if code is not None else 1006] += 1
        self.drop(conn)

    # --- setup calls (create_group, create_dm, ...), pipelined, answered together ----------

    def start_calls(self, calls: list) -> None:
        self.calls = [None] * len(calls)
        self.calls_left = len(calls)
        if not calls:
            self.emit({"ev": "calls", "results": []})
        for i, (idx, cmd) in enumerate(calls):
            self.request(self.conns[idx], lambda rid, cmd=cmd: self.dialect.command(rid, cmd), "call", i)

    def call_result(self, i: int, kind: str, body) -> None:
        if kind != "ok":
            result = {"error": str(body)}
        elif isinstance(body, dict) and isinstance(body.get("room"), dict):
            result = {"room_id": body["room"].get("room_id")}
        else:
            result = {"ok": True}
        self.calls[i] = result
        self.calls_left -= 1
        if self.calls_left == 0:
            self.emit({"ev": "calls", "results": self.calls})

    # --- probe: one connection pings the server on an interval (responsiveness) -------------

    def probe_tick(self, now: int) -> float:
        probe = self.probe
        if probe["rid"] is not None or now < probe["next"] or probe["conn"].state != READY:
            return 0.005
        probe["next"] = now + probe["interval"]
        probe["rid"] = self.request(probe["conn"], lambda rid: self.dialect.command(rid, {"type": "ping"}), "probe")
        return probe["interval"] / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatd.bench.loader")
    p.add_argument("--proto", choices=("chatd", "sio"), default="chatd")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/ws")
    p.add_argument("--secret", required=True)
    p.add_argument("--max-seconds", type=float, default=900.0)
    loader = Loader(p.parse_args(argv))
    try:
        loader.run()
    except Exception as exc:  # reported to the orchestrator, which stops the run
        loader.emit({"ev": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
