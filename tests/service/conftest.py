"""Helpers for the protocol-v1 matrix: servers with custom config, several users
at once, short client ids, and a direct look into the test's database.

Everything talks to a real chatd over real sockets with the raw msgpack client
in tests/wire.py; the database is read with a plain psycopg connection so a test
can check what was committed independently of the server.
"""

from __future__ import annotations

import itertools
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

import msgpack
import psycopg
import pytest
import trio
from trio_websocket import ConnectionClosed

from chatd.auth.tokens import mint
from tests.conftest import SECRET, start_server
from tests.wire import Wire, connect

_ids = itertools.count(1)


def cid(prefix: str = "c") -> str:
    """A fresh client id (client_id / client_msg_id)."""
    return f"{prefix}-{next(_ids)}"


def expired_token(user_id: str) -> str:
    """Correctly signed, expired an hour ago (well past the verifier's leeway)."""
    return mint(SECRET, user_id, ttl=60, now=time.time() - 3600)


@pytest.fixture
def make_server(nursery, tmp_path, db_conninfo):
    """``await make_server(limits={...}, websocket={...})`` -> a running app.Server."""
    started = []

    async def make(**sections: Any):
        server = await start_server(nursery, tmp_path, db_conninfo, **sections)
        started.append(server)
        return server

    yield make
    for server in started:
        server.request_stop()


@asynccontextmanager
async def clients(server, *users: str) -> AsyncIterator[list[Wire]]:
    """One connected (welcomed) raw client per name, closed together."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(server, user)) for user in users]


async def register(server, *users: str) -> None:
    """Make users exist (a user exists once they said hello)."""
    async with clients(server, *users):
        pass


async def group(owner: Wire, members: list[str] = (), *, title: str = "room", public: bool = False) -> dict:
    """Create a group and wait until the owner saw its whole creation log; returns RoomInfo."""
    room = (await owner.call("create_group", title=title, members=list(members), public=public, client_id=cid("g")))["room"]
    await until_seq(owner, room["room_id"], room["last_seq"])
    return room


async def until_seq(wire: Wire, room_id: int, seq: int, timeout: float = 5) -> list[dict]:
    """Live events of a room up to and including ``seq`` (must arrive in order, no gaps)."""
    events = []
    with trio.fail_after(timeout):
        while not events or events[-1]["seq"] < seq:
            events.append(await wire.next_of("event", room_id=room_id))
    return events


async def send(wire: Wire, room_id: int, body: str, **fields: Any) -> dict:
    return await wire.call("send", room_id=room_id, client_msg_id=cid("m"), body=body, **fields)


async def frames_until_closed(wire: Wire, timeout: float = 5) -> tuple[list[dict], int, str]:
    """Every frame the server still sends, then its close (code, reason)."""
    frames = list(wire.backlog)
    wire.backlog.clear()
    with trio.fail_after(timeout):
        try:
            while True:
                frames.append(msgpack.unpackb(await wire.ws.get_message(), strict_map_key=False))
        except ConnectionClosed as exc:
            return frames, exc.reason.code, exc.reason.reason or ""


async def db_fetch(conninfo: str, query: str, *params: Any) -> list[tuple]:
    """Run one read on the test database in a worker thread (the server shares our loop)."""

    def run() -> list[tuple]:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            return conn.execute(query, params).fetchall()

    return await trio.to_thread.run_sync(run)


async def db_execute(conninfo: str, statement: str, *params: Any) -> None:
    """Change the test database behind the server's back (e.g. disable a user)."""

    def run() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(statement, params)

    await trio.to_thread.run_sync(run)


async def still_works(sender: Wire, receiver: Wire, room_id: int) -> None:
    """The sender can still send and the receiver still gets it live."""
    sent = await send(sender, room_id, "still here?")
    got = await receiver.next_of("event", room_id=room_id, seq=sent["seq"])
    assert got["data"] == {"body": "still here?"}


async def silent(wire: Wire, seconds: float = 0.3, *types: str) -> None:
    """Assert that no frame of ``types`` (of any type if none given) arrives for the
    whole of ``seconds``; frames of other types are kept in the backlog."""
    assert not [f for f in wire.backlog if not types or f["type"] in types], wire.backlog
    with trio.move_on_after(seconds):
        while True:
            frame = msgpack.unpackb(await wire.ws.get_message(), strict_map_key=False)
            assert types and frame["type"] not in types, frame
            wire.backlog.append(frame)
