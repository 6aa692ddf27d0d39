"""``python -m chatd.bench.gcwatch --gc-log FILE serve --config ...``: chatd with its GC pauses logged.

chatd's own metric (``chatd_gc_max_pause_seconds`` on /metrics) keeps one maximum per
generation since start; the bench needs the pauses inside each step's window, so it
starts the server through this wrapper: a ``gc.callbacks`` hook times every collection
and appends the ones of ``--min-ms`` or more to FILE as
``<monotonic_ns at end> <pause_ns> <generation> <cpu_ns> <collected>`` lines: the thread
CPU time the collection took and the objects it freed (one ``write`` per logged pause;
the hook itself costs ~1-2 µs per collection). The bench takes the longest pause
inside each load step's window, in wall time (what clients wait) and in CPU time (the
collector's own work: on a busy machine the wall time also holds the time the process
was not scheduled). Everything else is the
normal ``chatd`` command line.
"""

from __future__ import annotations

import gc
import os
import sys
import time


def install(path: str, min_ns: int):
    """Start logging collections of ``min_ns`` or more to ``path``; returns the hook (in ``gc.callbacks``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    started = [0, 0]
    clock = time.perf_counter_ns
    cpu_clock = time.thread_time_ns

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = clock()
            started[1] = cpu_clock()
            return
        pause = clock() - started[0]
        if pause >= min_ns:
            cpu = cpu_clock() - started[1]
            line = (time.monotonic_ns(), pause, info.get("generation", -1), cpu, info.get("collected", -1))
            os.write(fd, b"%d %d %d %d %d\n" % line)

    gc.callbacks.append(on_gc)
    return on_gc


def read_pauses(path: str, start_ns: int, end_ns: int) -> list[tuple[int, int, int, int]]:
    """(end time, pause ns, CPU ns, generation) of the logged pauses that ended inside [start_ns, end_ns]."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and start_ns <= int(parts[0]) <= end_ns:
                    out.append((int(parts[0]), int(parts[1]), int(parts[3]), int(parts[2])))
    except OSError:
        pass
    return out


def main(argv: list[str]) -> int:
    min_ms = 0.1
    if len(argv) >= 2 and argv[0] == "--gc-log":
        path, argv = argv[1], argv[2:]
        if len(argv) >= 2 and argv[0] == "--min-ms":
            min_ms, argv = float(argv[1]), argv[2:]
        install(path, int(min_ms * 1e6))
    from chatd.cli import main as chatd_main

    return chatd_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
