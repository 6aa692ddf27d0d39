"""Shared helpers for client tests: token providers and event collection."""

from __future__ import annotations

from typing import Any, Callable

import trio

from tests.conftest import token


def tokens(user: str, ttl: float = 600) -> Callable[[], str]:
    """A token provider minting a fresh token for ``user`` on every call."""
    return lambda: token(user, ttl=ttl)


async def until_seq(events: trio.MemoryReceiveChannel, room_id: int, seq: int) -> list[dict[str, Any]]:
    """Every item read from ``events`` until the durable event ``(room_id, seq)``."""
    items = []
    async for item in events:
        items.append(item)
        if item.get("type") == "event" and item["room_id"] == room_id and item["seq"] >= seq:
            return items
    raise AssertionError(f"events() ended before seq {seq} of room {room_id}: {items[-5:]}")


def seqs(items: list[dict[str, Any]], room_id: int) -> list[int]:
    return [i["seq"] for i in items if i.get("type") == "event" and i["room_id"] == room_id]


async def full_log(client, room_id: int) -> list[tuple[int, str]]:
    """(seq, kind) of every event of the room the client's user may see, via history."""
    out: list[tuple[int, str]] = []
    after = 0
    while True:
        page = await client.history(room_id, after=after)
        out += [(e["seq"], e["kind"]) for e in page["events"]]
        if not page["has_more"]:
            return out
        after = out[-1][0]


async def wait_for(predicate: Callable[[], bool], interval: float = 0.01) -> None:
    while not predicate():
        await trio.sleep(interval)


async def next_of(events: trio.MemoryReceiveChannel, type_: str, **match: Any) -> dict[str, Any]:
    """The next item of ``type_`` whose fields equal ``match``; others are skipped."""
    async for item in events:
        if item.get("type") == type_ and all(item.get(k) == v for k, v in match.items()):
            return item
    raise AssertionError(f"events() ended before a {type_} frame")
