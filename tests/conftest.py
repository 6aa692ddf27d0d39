"""Shared fixtures: a real PostgreSQL (the embedded one) for the whole session,
a migrated template database, and a fresh database cloned from it per test.

pytest-trio runs each test in its own trio loop, so the session-wide server
lives in a thread with a trio loop of its own.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest
import trio

from chatd.config import Config, load, to_toml
from chatd.store.embedded import open_embedded_postgres
from chatd.store.migrate import migrate
from chatd.store.pool import open_pool

TEMPLATE = "chatd_template"
SECRET = "test-secret-0123456789-0123456789-abcdef"
_db_numbers = itertools.count(1)


def _world_traversable_tmpdir(prefix: str) -> Path:
    # mkdtemp makes 0700 dirs; the embedded server may run as `nobody` (tests as root).
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def pg_server():
    state = _world_traversable_tmpdir("chatd-test-pg-")
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    async def main() -> None:
        async with open_embedded_postgres(state, port=0, start_timeout=120) as server:
            with psycopg.connect(server.conninfo("postgres"), autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
                conn.execute(f"CREATE DATABASE {TEMPLATE}")
            async with open_pool(server.conninfo(TEMPLATE), size=1, acquire_timeout=10, connect_timeout=10, query_timeout=60) as pool:
                await migrate(pool)
            ready.put(server)
            while not stop.is_set():
                await trio.sleep(0.05)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the fixture
            ready.put(exc)

    thread = threading.Thread(target=run, name="embedded-postgres", daemon=True)
    thread.start()
    server = ready.get(timeout=180)
    if isinstance(server, BaseException):
        raise server
    yield server
    stop.set()
    thread.join(60)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def db_conninfo(pg_server):
    """A fresh, migrated database for one test; dropped afterwards."""
    name = f"t{os.getpid()}_{next(_db_numbers)}"
    with psycopg.connect(pg_server.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    yield pg_server.conninfo(name)
    with psycopg.connect(pg_server.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def pool(db_conninfo):
    async with open_pool(db_conninfo, size=5, acquire_timeout=5, connect_timeout=5, query_timeout=20) as p:
        yield p


def make_config(tmp_path: Path, db_url: str = "", **sections) -> Config:
    """A Config for an in-process or subprocess server on loopback, ports 0.

    ``sections`` override keys, e.g. ``websocket={"hello_timeout": 0.5}``.
    """
    data = {
        "server": {"shutdown_grace": 5.0},
        "http": {"host": "127.0.0.1", "port": 0},
        "websocket": {"host": "127.0.0.1", "port": 0},
        "database": {"url": db_url},
        "auth": {"hs256_secret": SECRET},
        "log": {"format": "json", "level": "info"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "chatd.toml"
    path.write_text(to_toml(data))
    return load(path, env={})


@pytest.fixture
async def chatd_server(db_conninfo, tmp_path, nursery):
    """A chatd running in this test's trio loop on a fresh database (ports 0).

    Yields app.Server: ``ws_url``, ``http_urls``, ``service``, ``request_stop()``.
    Override config with ``@pytest.mark.parametrize("chatd_config", [...], indirect=True)``.
    """
    from chatd.app import serve

    cfg = make_config(tmp_path, db_conninfo)
    server = await nursery.start(lambda task_status: serve(cfg, install_signal_handlers=False, task_status=task_status))
    yield server
    server.request_stop()


def token(user_id: str, ttl: float = 600, **extra) -> str:
    from chatd.auth.tokens import mint

    return mint(SECRET, user_id, ttl=ttl, extra=extra or None)


async def start_server(nursery, tmp_path, db_conninfo, **sections):
    """Start chatd in ``nursery`` with config overrides; returns app.Server."""
    from chatd.app import serve

    cfg = make_config(tmp_path, db_conninfo, **sections)
    return await nursery.start(lambda task_status: serve(cfg, install_signal_handlers=False, task_status=task_status))
