"""CPU and memory of processes from /proc, and a description of the machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_ns(pid: int) -> int:
    """User + system CPU time of ``pid`` (not its children), in ns; 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_NS  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (e.g. the embedded PostgreSQL and its backends)."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found.extend(kids)
        frontier.extend(kids)
    return found


def machine_busy_ns() -> int:
    """CPU time every core spent busy (all processes, kernel included) since boot, in ns."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) * TICK_NS


class Meter:
    """CPU of one process (and optionally its descendants) between two marks."""

    def __init__(self, pid: int, with_children: bool = False) -> None:
        self.pid = pid
        self.with_children = with_children
        self._start = (0, 0)
        self._machine = 0

    def sample(self) -> tuple[int, int]:
        own = cpu_ns(self.pid)
        kids = sum(cpu_ns(p) for p in descendants(self.pid)) if self.with_children else 0
        return own, kids

    def mark(self) -> None:
        self._start = self.sample()
        self._machine = machine_busy_ns()

    def machine_since(self) -> int:
        """Busy CPU ns of the whole machine since the last mark (every process, every core)."""
        return machine_busy_ns() - self._machine

    def since(self) -> tuple[int, int]:
        """(own, descendants) CPU ns since the last mark."""
        own, kids = self.sample()
        return own - self._start[0], kids - self._start[1]


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError):
        nofile = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "open_files_limit": nofile,
    }
