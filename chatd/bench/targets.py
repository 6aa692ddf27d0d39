"""Servers under test: chatd on a fresh embedded PostgreSQL, or one of the peers.

Each target starts its server as a child process on loopback (free ports picked by
binding port 0), waits until the WebSocket port accepts, and on ``stop`` ends exactly
the processes it started, by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Callable

from chatd.bench import dbwatch, gcwatch, peers, procstat
from chatd.bench.fleet import BenchError

SECRET = "chatd-bench-secret-0123456789-abcdefghijklmnop"
TARGETS = ("chatd", "ws", "socketio", "pysocketio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready: Callable[[], bool], what: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``ready`` every 10 ms (the `start` scenario times this wait) until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise BenchError(f"server exited with {proc.returncode} before it would {what}:\n{tail}")
        if ready():
            return
        time.sleep(0.01)
    raise BenchError(f"server did not {what} within {timeout:.0f} s (log: {log})")


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_200(port: int, path: str) -> bool:
    http = HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        http.request("GET", path)
        return http.getresponse().status == 200
    except (OSError, HTTPException):
        return False
    finally:
        http.close()


def _end(pid: int, grace: float) -> None:
    """SIGTERM one process we started, SIGKILL it if it outlives ``grace``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Target:
    name = ""
    proto = "chatd"
    path = "/ws"
    has_db = False

    def __init__(self, work: Path, cache: Path) -> None:
        self.work = work
        self.cache = cache  # peer packages, kept between runs
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = work / f"{self.name}.log"
        self.ready_s: float | None = None  # the last start: spawn to ready, in seconds
        self._spawned = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def meter(self) -> procstat.Meter:
        return procstat.Meter(self.pid, with_children=self.has_db)

    def rss(self) -> int:
        return procstat.rss_bytes(self.pid)

    def db_rss(self) -> int | None:
        return None

    def gc_pause_ms(self, start_ns: int, end_ns: int) -> tuple[float | None, float | None, int | None]:
        """Longest GC pause in the window: (wall ms, CPU ms, generation of the longest
        in CPU time); None where not measured."""
        return None, None, None

    def db_sampler(self) -> dbwatch.Sampler | None:
        """A sampler of the server's database activity for one step; None without a database."""
        return None

    def _launch(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> None:
        self.port = self.port or free_port()
        self._spawned = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        _wait(partial(_listens, self.port), f"listen on {self.port}", self.proc, self.log, timeout)
        self.ready_s = time.monotonic() - self._spawned

    def start(self) -> None:
        """Start the server and wait until it is ready; ``ready_s`` says how long that took."""
        raise NotImplementedError

    def restart(self) -> None:
        """End the server and start it again (chatd: on the same database)."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _end(self.proc.pid, 20)
            self.proc.wait(5)


class ChatdTarget(Target):
    name = "chatd"
    has_db = True

    def __init__(self, work: Path, cache: Path) -> None:
        super().__init__(work, cache)
        self.state: Path | None = None
        self.http_port = 0
        self.gc_log = work / "chatd-gc.log"
        self.children: list[int] = []

    def start(self) -> None:
        cfg = self._configure()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
        self._launch([sys.executable, "-m", "chatd.bench.gcwatch", "--gc-log", str(self.gc_log), "serve", "--config", str(cfg)], env, timeout=180)
        try:
            # Ready is what an operator's load balancer waits for: /readyz answering 200.
            _wait(partial(_answers_200, self.http_port, "/readyz"), "answer GET /readyz with 200", self.proc, self.log, 60)
        finally:  # also when it never got ready: stop() ends its PostgreSQL by these PIDs
            self.children = procstat.descendants(self.pid)
        self.ready_s = time.monotonic() - self._spawned

    def restart(self) -> None:
        Target.stop(self)  # chatd stops its embedded PostgreSQL; the database stays
        self._end_children()
        self.start()

    def _configure(self) -> Path:
        """The run's state directory and config file, made on the first start."""
        from chatd.config import to_toml

        cfg = self.work / "chatd-bench.toml"
        if self.state is not None:
            return cfg
        # A short fresh directory of its own: the unix socket path must stay under 108
        # bytes, and the embedded PostgreSQL runs as `nobody` when we are root, so every
        # directory on the way must be traversable (a pytest tmp_path is not).
        self.state = Path(tempfile.mkdtemp(prefix="chatd-bench-"))
        self.state.chmod(0o755)
        self.port = free_port()
        self.http_port = free_port()
        config = {
            "server": {"shutdown_grace": 5.0},
            "http": {"host": "127.0.0.1", "port": self.http_port},
            "websocket": {"host": "127.0.0.1", "port": self.port, "path": "/ws"},
            "database": {"url": "", "embedded": {"state_dir": str(self.state)}},
            "auth": {"hs256_secret": SECRET},
            # The peers have no per-connection rate limit; the bench offers the load.
            "limits": {"commands_per_second": 100000.0, "command_burst": 100000},
            "log": {"format": "json", "level": "warning"},
        }
        cfg.write_text(to_toml(config))
        return cfg

    def _end_children(self) -> None:
        for pid in self.children:
            if Path(f"/proc/{pid}").exists():
                _end(pid, 10)

    def db_rss(self) -> int | None:
        return sum(procstat.rss_bytes(p) for p in procstat.descendants(self.pid))

    def db_sampler(self) -> dbwatch.Sampler | None:
        from chatd.config import DatabaseConfig  # the bench's chatd runs on the default database name

        return dbwatch.Sampler(dbwatch.embedded_conninfo(self.state, DatabaseConfig().name))

    def gc_pause_ms(self, start_ns: int, end_ns: int) -> tuple[float | None, float | None, int | None]:
        pauses = gcwatch.read_pauses(str(self.gc_log), start_ns, end_ns)
        wall = max((p for _, p, _, _ in pauses), default=0)
        cpu, generation = max(((c, g) for _, _, c, g in pauses), default=(0, None))
        return round(wall / 1e6, 2), round(cpu / 1e6, 2), generation

    def stop(self) -> None:
        # chatd stops its embedded PostgreSQL on SIGTERM; should it be killed instead,
        # the PostgreSQL processes it started are ended by the PIDs recorded at start.
        super().stop()
        self._end_children()
        if self.state is not None:
            shutil.rmtree(self.state, ignore_errors=True)
            self.state = None


class NodeWsPeer(Target):
    name = "ws"
    script = "ws/server.js"

    def start(self) -> None:
        modules = peers.node_modules(self.cache)
        self.port = free_port()
        env = dict(os.environ, NODE_PATH=str(modules))
        self._launch(["node", str(peers.PEERS / self.script), "--port", str(self.port), "--secret", SECRET], env)


class NodeSocketIoPeer(NodeWsPeer):
    name = "socketio"
    proto = "sio"
    script = "socketio/server.js"


class PySocketIoPeer(Target):
    name = "pysocketio"
    proto = "sio"

    def start(self) -> None:
        python = peers.python_env(self.cache)
        self.port = free_port()
        self._launch([str(python), str(peers.PEERS / "python-socketio" / "server.py"), "--port", str(self.port), "--secret", SECRET])


def make(name: str, work: Path, cache: Path) -> Target:
    classes = {"chatd": ChatdTarget, "ws": NodeWsPeer, "socketio": NodeSocketIoPeer, "pysocketio": PySocketIoPeer}
    if name not in classes:
        raise BenchError(f"unknown target {name!r} (one of {', '.join(TARGETS)})")
    work = work / name
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)
    cache.mkdir(parents=True, exist_ok=True)
    return classes[name](work, cache)
