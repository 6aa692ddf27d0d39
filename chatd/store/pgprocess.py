"""Finding and stopping PostgreSQL server processes by PID, verified through /proc.

Used by the embedded-database helper: it only ever signals a process it started,
or a postmaster whose command line names its own data directory.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import trio

from chatd.errors import EmbeddedDatabaseError

POLL = 0.02
KILL_WAIT = 5.0  # SIGKILL takes effect in moments; this only bounds the wait


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def alive(pid: int) -> bool:
    try:
        return stat_fields(pid)[0] != "Z"  # a zombie nobody reaps holds no files or memory
    except (OSError, IndexError):
        return False


def is_postgres(pid: int) -> bool | None:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)") == "postgres"
    except PermissionError:
        return None
    except OSError:
        return False


def is_postmaster_of(pid: int, data_dir: Path) -> bool | None:
    """True if pid is a postgres started with ``-D data_dir``; None if we may not look."""
    if not (verdict := is_postgres(pid)):
        return verdict
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    want = os.path.realpath(data_dir)
    return any(a == b"-D" and os.path.realpath(os.fsdecode(b)) == want for a, b in zip(args, args[1:]))


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a verified postmaster and its postgres children; return the pids signalled."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and stat_fields(int(entry.name))[1] == str(pid):
                pids += [int(entry.name)] if is_postgres(int(entry.name)) else []
        except (OSError, IndexError):
            continue
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


async def wait_gone(pids: list[int], timeout: float) -> bool:
    with trio.move_on_after(timeout):
        while any(alive(p) for p in pids):
            await trio.sleep(POLL)
        return True
    return False


async def stop_pid(pid: int, timeout: float) -> None:
    """Stop a verified postmaster that is not our child."""
    try:
        os.kill(pid, signal.SIGINT)  # fast shutdown: roll back sessions, checkpoint, exit
    except ProcessLookupError:
        return
    if not await wait_gone([pid], timeout) and not await wait_gone(kill_tree(pid), KILL_WAIT):
        raise EmbeddedDatabaseError(f"a leftover PostgreSQL (pid {pid}) survived SIGKILL")


async def stop_child(process: trio.Process, timeout: float, log: Any) -> None:
    """Fast shutdown of our postmaster, SIGKILL after ``timeout``. Call it shielded."""
    if process.returncode is None:
        process.send_signal(signal.SIGINT)
        with trio.move_on_after(timeout):
            await process.wait()
    if process.returncode is None:
        log.warning("db.embedded.kill", pid=process.pid, after_seconds=timeout)
        children = kill_tree(process.pid)
        with trio.move_on_after(KILL_WAIT):
            await process.wait()
        await wait_gone(children, KILL_WAIT)
    log.info("db.embedded.stopped", pid=process.pid, returncode=process.returncode)


async def kill_group(process: trio.Process) -> None:
    """``deliver_cancel`` for a short command started with ``start_new_session``: SIGKILL
    its whole process group and wait until none of it runs (zombies aside).

    initdb runs its postgres backends through a shell: killing initdb alone would leave
    them writing into the half-made data directory the next start is about to remove.
    """
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a new session's group id is its pid
    except ProcessLookupError:
        return
    with trio.move_on_after(KILL_WAIT):
        while _group_alive(process.pid):
            await trio.sleep(POLL)


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                fields = stat_fields(int(entry.name))
                if fields[2] == str(pgid) and fields[0] != "Z":
                    return True
        except (OSError, IndexError):
            continue
    return False
