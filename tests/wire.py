"""A raw protocol client for tests: frames built and read with the independent
``msgpack`` package (not chatd's codec), over trio-websocket, so tests prove
wire compatibility as a third-party client would see it.
"""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import msgpack
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.conftest import token


class Wire:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.backlog: list[dict] = []  # frames read while waiting for something else

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send_message(data)

    async def send(self, type_: str, **fields: Any) -> Any:
        """Send a command; returns its request id."""
        rid = fields.pop("id", None) or next(self.ids)
        await self.ws.send_message(msgpack.packb({"type": type_, "id": rid, **fields}))
        return rid

    async def recv(self, timeout: float = 5) -> dict:
        if self.backlog:
            return self.backlog.pop(0)
        with trio.fail_after(timeout):
            return msgpack.unpackb(await self.ws.get_message(), strict_map_key=False)

    async def reply(self, rid: Any, timeout: float = 5) -> dict:
        """The reply to request ``rid``; other frames are kept for later."""
        for i, frame in enumerate(self.backlog):
            if frame.get("id") == rid and frame["type"] in ("result", "error", "welcome"):
                return self.backlog.pop(i)
        with trio.fail_after(timeout):
            while True:
                frame = msgpack.unpackb(await self.ws.get_message(), strict_map_key=False)
                if frame.get("id") == rid and frame["type"] in ("result", "error", "welcome"):
                    return frame
                self.backlog.append(frame)

    async def call(self, type_: str, **fields: Any) -> dict:
        """Send and return the result body; raises AssertionError on an error frame."""
        frame = await self.reply(await self.send(type_, **fields))
        assert frame["type"] != "error", frame
        return frame

    async def error(self, type_: str, **fields: Any) -> dict:
        frame = await self.reply(await self.send(type_, **fields))
        assert frame["type"] == "error", frame
        return frame

    async def next_of(self, type_: str, timeout: float = 5, **match: Any) -> dict:
        """The next frame of ``type_`` whose fields match; others stay in the backlog."""
        for i, frame in enumerate(self.backlog):
            if frame["type"] == type_ and all(frame.get(k) == v for k, v in match.items()):
                return self.backlog.pop(i)
        with trio.fail_after(timeout):
            while True:
                frame = msgpack.unpackb(await self.ws.get_message(), strict_map_key=False)
                if frame["type"] == type_ and all(frame.get(k) == v for k, v in match.items()):
                    return frame
                self.backlog.append(frame)

    async def events(self, room_id: int, count: int, timeout: float = 5) -> list[dict]:
        return [await self.next_of("event", timeout, room_id=room_id) for _ in range(count)]

    async def nothing(self, seconds: float = 0.3, type_: str | None = None) -> None:
        """Assert no frame (of ``type_``) arrives within ``seconds``."""
        assert not [f for f in self.backlog if type_ is None or f["type"] == type_], self.backlog
        with trio.move_on_after(seconds):
            frame = msgpack.unpackb(await self.ws.get_message(), strict_map_key=False)
            assert type_ is not None and frame["type"] != type_, frame
            self.backlog.append(frame)

    async def closed(self, timeout: float = 5) -> tuple[int, str]:
        """Wait for the server to close; returns (code, reason)."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code, exc.reason.reason or ""


@asynccontextmanager
async def connect(server, user: str | None = None, *, hello: bool = True, **hello_fields) -> AsyncIterator[Wire]:
    """A raw connection; with ``user``, hello is sent and the welcome kept in ``.welcome``."""
    async with open_websocket_url(server.ws_url) as ws:
        wire = Wire(ws)
        if user is not None and hello:
            fields = {"version": 1, "token": token(user), **hello_fields}
            wire.welcome = await wire.reply(await wire.send("hello", **fields))
            assert wire.welcome["type"] == "welcome", wire.welcome
        yield wire
