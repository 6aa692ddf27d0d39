"""The loader's connection set-up: non-blocking connects from its own source addresses,
the WebSocket upgrade and hello (see ``loop.on_full_read``), timeouts, and reconnects.
"""

from __future__ import annotations

import errno
import socket
import time

from chatd.bench import stats
from chatd.bench.loop import CLOSED, READY, Conn

IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), not at bind()
CONNECT_TIMEOUT_NS = 30_000_000_000
OUT = 4  # select.EPOLLOUT
mono = time.monotonic_ns


class Connector:
    """Mixed into the Loader: needs its ``ep``, ``conns``, ``by_fd``, ``queue`` and counters."""

    def connect(self, users: list[str], sources: list[str], concurrency: int, ttl: float) -> None:
        from chatd.auth.tokens import mint

        self.concurrency = concurrency
        self.connect_wanted = len(users)
        for i, user in enumerate(users):
            conn = Conn(len(self.conns), user, sources[i % len(sources)])
            conn.token = mint(self.secret, user, ttl=ttl)
            self.conns.append(conn)
            self.queue.append(conn)

    def start_connect(self, conn: Conn, now: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((conn.src, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((self.host, self.port))
        except OSError as exc:
            err = exc.errno
        conn.sock, conn.fd, conn.t0 = sock, sock.fileno(), now
        self.connect_started = now if not self.connecting else self.connect_started
        self.connecting += 1
        if err not in (0, errno.EINPROGRESS):
            self.connect_failed(conn, f"connect: {errno.errorcode.get(err, err)}")
            return
        self.by_fd[conn.fd] = conn
        self.ep.register(conn.fd, OUT)

    def expire_connects(self, now: int) -> None:
        self.connect_started = now
        for conn in self.conns:
            if conn.state < READY and conn.sock is not None and now - conn.t0 > CONNECT_TIMEOUT_NS:
                self.connect_failed(conn, "connect timeout")

    def connect_failed(self, conn: Conn, why: str) -> None:
        self.errors[why] += 1
        self.failed += 1
        self.connecting -= 1
        self.drop(conn)

    def connect_done(self, conn: Conn) -> None:
        conn.state = READY
        conn.token = None
        self.ready += 1
        self.connecting -= 1
        us = (mono() - conn.t0) // 1000
        self.connect_h[stats.bucket(us)] += 1
        if self.mixing is not None:
            self.mixing.on_ready(self, conn)

    def reconnect(self, idx: int) -> None:
        """Drop connection ``idx`` without a close frame and connect again as the same user."""
        from chatd.auth.tokens import mint  # only loaders import PyJWT

        old = self.conns[idx]
        self.drop(old)
        for rid in [rid for rid, entry in self.pending.items() if entry[0] is old]:
            del self.pending[rid]
            self.dropped += 1
        conn = Conn(idx, old.user, old.src)
        conn.token = mint(self.secret, old.user, ttl=7200)
        conn.sampled = old.sampled
        self.conns[idx] = conn
        self.queue.append(conn)

    def drop(self, conn: Conn) -> None:
        if conn.state == READY:
            self.ready -= 1
        conn.state = CLOSED
        if conn.sock is not None:
            self.by_fd.pop(conn.fd, None)
            try:
                self.ep.unregister(conn.fd)
            except (OSError, ValueError):
                pass
            conn.sock.close()
            conn.sock = None
