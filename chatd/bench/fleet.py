"""The orchestrator's side of the load processes: start them, talk JSON lines, stop them.

Users are spread round-robin over the loaders; each loader binds its client sockets to
its own few 127.0.0.x source addresses, so no process nears the 20,000 open-files cap
and no (source, destination) pair runs out of ephemeral ports.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from chatd.bench import procstat

ADDRESSES_PER_LOADER = 4


class BenchError(Exception):
    """The run cannot go on (a loader died, a target did not start, a deadline passed)."""


class LoaderProcess:
    def __init__(self, k: int, *, proto: str, port: int, path: str, secret: str, max_seconds: float, log_dir: Path) -> None:
        self.k = k
        self.sources = [f"127.0.{1 + k // 60}.{10 + (k % 60) * ADDRESSES_PER_LOADER + j}" for j in range(ADDRESSES_PER_LOADER)]
        self.users: list[str] = []
        self.stderr = open(log_dir / f"loader-{k}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd.bench.loader", "--proto", proto, "--port", str(port), "--path", path,
             "--secret", secret, "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue = queue.Queue()
        self.stash: list[dict] = []  # messages read while waiting for another kind
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                self.lines.put({"ev": "fatal", "error": f"bad line from loader: {line[:200]!r}"})
        self.lines.put({"ev": "fatal", "error": f"loader {self.k} exited with {self.proc.wait()}"})

    def send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise BenchError(f"loader {self.k} is gone: {exc}") from None

    def expect(self, ev: str, timeout: float) -> dict:
        for i, msg in enumerate(self.stash):
            if msg.get("ev") == ev:
                return self.stash.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"loader {self.k}: no {ev!r} within {timeout:.0f} s")
            try:
                msg = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if msg.get("ev") == "fatal":
                raise BenchError(f"loader {self.k}: {msg.get('error')}")
            if msg.get("ev") == ev:
                return msg
            if msg.get("ev") in ("step_done", "calls", "connected"):
                self.stash.append(msg)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
            except BenchError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # our own child, by its handle
                self.proc.wait(10)
        self.stderr.close()


class Fleet:
    """All load processes of one run."""

    def __init__(self, n: int, *, proto: str, port: int, path: str, secret: str, max_seconds: float, log_dir: Path) -> None:
        self.loaders: list[LoaderProcess] = []
        try:
            for k in range(n):
                self.loaders.append(LoaderProcess(k, proto=proto, port=port, path=path, secret=secret, max_seconds=max_seconds, log_dir=log_dir))
        except BaseException:
            self.stop()
            raise
        self.where: dict[str, tuple[int, int]] = {}  # user -> (loader, connection index)
        self._cpu = [0] * n
        self._t = time.monotonic_ns()

    def place(self, users: list[str]) -> dict[int, list[str]]:
        """Assign users round-robin to loaders; returns the new users per loader."""
        out: dict[int, list[str]] = {}
        for i, user in enumerate(users):
            k = (len(self.where) + i) % len(self.loaders) if user not in self.where else self.where[user][0]
            out.setdefault(k, []).append(user)
        for k, names in out.items():
            loader = self.loaders[k]
            for name in names:
                self.where[name] = (k, len(loader.users))
                loader.users.append(name)
        return out

    def connect(self, users: list[str], *, concurrency: int = 256, timeout: float = 300, progress=None) -> dict:
        """Open (handshake + hello) a connection for each user; returns {"open", "failed", "seconds"}."""
        t0 = time.monotonic()
        placed = self.place(users)
        for k, names in placed.items():
            self.loaders[k].send({"op": "connect", "users": names, "src": self.loaders[k].sources, "concurrency": concurrency})
        failed = 0
        for k in placed:
            while True:
                try:
                    failed += self.loaders[k].expect("connected", 1.0)["failed"]
                    break
                except BenchError:
                    if time.monotonic() - t0 > timeout:
                        raise
                    if progress is not None:
                        progress(self.poll())
        return {"failed": failed, "seconds": time.monotonic() - t0}

    def calls(self, calls: list[tuple[str, dict]], timeout: float = 120) -> list[dict]:
        """Send set-up commands from the given users, pipelined; results in the same order."""
        per: dict[int, list[tuple[int, tuple[int, dict]]]] = {}
        for i, (user, cmd) in enumerate(calls):
            k, idx = self.where[user]
            per.setdefault(k, []).append((i, (idx, cmd)))
        for k, items in per.items():
            self.loaders[k].send({"op": "calls", "calls": [c for _, c in items]})
        results: list[dict] = [{}] * len(calls)
        for k, items in per.items():
            got = self.loaders[k].expect("calls", timeout)["results"]
            for (i, _), result in zip(items, got):
                results[i] = result
        return results

    def broadcast(self, obj: dict) -> None:
        for loader in self.loaders:
            loader.send(obj)

    def poll(self) -> dict:
        """Cumulative counters since the last report, summed over loaders."""
        self.broadcast({"op": "stats"})
        total: dict = {}
        for loader in self.loaders:
            for key, value in loader.expect("stats", 30).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total

    def reports(self) -> list[dict]:
        self.broadcast({"op": "report"})
        return [loader.expect("report", 60) for loader in self.loaders]

    def settle(self, quiet: float = 0.6, timeout: float = 60) -> None:
        """Wait until no loader has received a byte for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            rx = self.poll().get("rx", 0)
            if rx != last:
                last, since = rx, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)

    def mark_cpu(self) -> None:
        self._cpu = [procstat.cpu_ns(l.pid) for l in self.loaders]
        self._t = time.monotonic_ns()

    def cpu_pct(self) -> tuple[float, float, int]:
        """(sum over loaders, busiest loader) CPU % of one core since ``mark_cpu``, and the sum in ns."""
        wall = max(1, time.monotonic_ns() - self._t)
        used = [procstat.cpu_ns(l.pid) - c for l, c in zip(self.loaders, self._cpu)]
        return round(sum(used) * 100 / wall, 1), round(max(used) * 100 / wall, 1), sum(used)

    def stop(self) -> None:
        for loader in self.loaders:
            loader.stop()
