"""`chatd serve` as a real process on the embedded PostgreSQL."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
import trio
from trio_websocket import open_websocket_url

from chatd.store import pgprocess
from chatd.store.migrate import available
from tests.conftest import SECRET, token

pytestmark = pytest.mark.slow


@pytest.fixture
def state():
    """A state directory for one `chatd serve`, removed afterwards (its database is ~90 MB)."""
    path = Path(tempfile.mkdtemp(prefix="chatd-serve-"))
    path.chmod(0o755)  # the embedded PostgreSQL may run as nobody
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_config(state: Path, **extra: str) -> Path:
    text = f"""
[server]
shutdown_grace = 5.0
[http]
port = 0
[websocket]
port = 0
[database.embedded]
state_dir = "{state / 'state'}"
[auth]
hs256_secret = "{SECRET}"
[log]
format = "json"
"""
    for section, body in extra.items():
        text += f"[{section}]\n{body}\n"
    path = state / "chatd.toml"
    path.write_text(text)
    return path


class Serve:
    """A `chatd serve` child process whose JSON log lines we read."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[dict] = []

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for entry in self.lines:
            if entry.get("event") == event:
                return entry
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            self.lines.append(entry)
            if entry.get("event") == event:
                return entry
        raise AssertionError(f"no {event!r} in log; exit={self.proc.poll()} lines={self.lines[-5:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            self.proc.stdout.close()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def _hello(ws_url: str, user: str) -> dict:
    async with open_websocket_url(ws_url) as ws:
        await ws.send_message(msgpack.packb({"type": "hello", "id": 1, "version": 1, "token": token(user)}))
        with trio.fail_after(10):
            return msgpack.unpackb(await ws.get_message(), strict_map_key=False)


async def test_serve_starts_answers_and_stops_cleanly_on_sigterm(state):
    server = Serve(_write_config(state))
    try:
        ready = await trio.to_thread.run_sync(server.wait_for, "chatd.ready")
        pg = server.wait_for("db.embedded.started")
        assert ready["http"].startswith("http://127.0.0.1:") and ready["websocket"].startswith("ws://127.0.0.1:")
        assert "embedded PostgreSQL" in ready["database"]
        status, body = await trio.to_thread.run_sync(_get, ready["http"] + "/readyz")
        assert (status, body["status"]) == (200, "ready")
        status, body = await trio.to_thread.run_sync(_get, ready["http"] + "/healthz")
        assert status == 200 and body["status"] == "alive"
        welcome = await _hello(ready["websocket"], "alice")
        assert welcome["type"] == "welcome" and welcome["protocol"] == 1 and welcome["server"].startswith("chatd/")
        started = time.monotonic()
        code = await trio.to_thread.run_sync(server.stop)
        assert code == 0
        assert time.monotonic() - started < 5.0 + 3.0, "did not stop within the grace period"
        assert not pgprocess.alive(pg["pid"]), "the embedded PostgreSQL outlived chatd"
    finally:
        server.stop(signal.SIGKILL)


async def test_config_error_exits_2_before_binding_anything(state):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = _write_config(state)
    config.write_text(config.read_text().replace("[http]\nport = 0", f"[http]\nport = {port}\nprot = 1"))
    run = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "chatd", "serve", "--config", str(config)], capture_output=True, text=True, timeout=60)
    )
    assert run.returncode == 2
    assert "unknown key 'http.prot'" in run.stderr and f"{config}:" in run.stderr
    assert not (state / "state").exists(), "the database was started despite the config error"


async def test_port_in_use_is_a_clear_startup_error(state):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        config = _write_config(state)
        config.write_text(config.read_text().replace("[websocket]\nport = 0", f"[websocket]\nport = {port}"))
        run = await trio.to_thread.run_sync(
            lambda: subprocess.run([sys.executable, "-m", "chatd", "serve", "--config", str(config)], capture_output=True, text=True, timeout=90)
        )
        assert run.returncode == 1
        assert f"127.0.0.1:{port}" in run.stderr and "in use" in run.stderr
    finally:
        holder.close()


async def test_restart_after_a_crash_reuses_data_and_leaves_no_orphan(state):
    config = _write_config(state)
    first = Serve(config)
    try:
        ready = await trio.to_thread.run_sync(first.wait_for, "chatd.ready")
        pg_pid = first.wait_for("db.embedded.started")["pid"]
        await _hello(ready["websocket"], "alice")
    finally:
        first.stop(signal.SIGKILL)  # a crash: no drain, postgres left behind
    second = Serve(config)
    try:
        ready = await trio.to_thread.run_sync(second.wait_for, "chatd.ready")
        assert not pgprocess.alive(pg_pid), "the crashed chatd's PostgreSQL is still running"
        welcome = await _hello(ready["websocket"], "alice")
        assert welcome["type"] == "welcome"
        assert await trio.to_thread.run_sync(second.stop) == 0
    finally:
        second.stop(signal.SIGKILL)


async def test_migrate_command_reports_the_schema_version(state):
    config = _write_config(state)
    run = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "chatd", "migrate", "--config", str(config)], capture_output=True, text=True, timeout=120)
    )
    assert run.returncode == 0, run.stderr
    latest = len(available())
    assert latest >= 2 and f"schema at version {latest} ({latest} applied now)" in run.stdout
    again = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "chatd", "migrate", "--config", str(config)], capture_output=True, text=True, timeout=120)
    )
    assert f"schema at version {latest} (0 applied now)" in again.stdout


async def test_token_issue_mints_a_token_the_server_accepts(state):
    from chatd.auth.tokens import TokenVerifier
    from chatd.config import load

    config = _write_config(state)
    run = await trio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "chatd", "token", "issue", "--user", "carol", "--ttl", "120", "--config", str(config)],
                               capture_output=True, text=True, timeout=60)
    )
    assert run.returncode == 0, run.stderr
    identity = await TokenVerifier(load(config, env={}).auth).verify(run.stdout.strip())
    assert identity.user_id == "carol" and 100 < identity.expires_at - time.time() <= 121  # exp rounds up
