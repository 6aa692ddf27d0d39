"""Presence flushes as plain function calls: a flush to many watchers goes out in parts."""

import json

from chatd.registry.presence import FLUSH_CHUNK, Presence
from chatd.registry.rooms import Rooms
from tests.registry.test_rooms import session


def test_a_flush_to_many_watchers_yields_between_parts_and_tells_each_once():
    rooms = Rooms(lambda obj: b"")
    presence = Presence(rooms, lambda obj: json.dumps(obj).encode(), window=0.1)
    watchers = [session(rooms, f"w{i}") for i in range(FLUSH_CHUNK * 2 + 10)]
    for s, _ in watchers:
        presence.subscribe(s, ["alice"])
    alice, _ = session(rooms, "alice")
    assert presence.recompute("alice")  # offline -> online
    parts = 0
    for _ in presence.flush_in_parts():
        parts += 1
        delivered = sum(len(box.writes) for _, box in watchers)
        assert delivered == FLUSH_CHUNK * parts  # each part sends one chunk, then yields
    assert parts == 2
    for _, box in watchers:
        assert [json.loads(w) for w in box.writes] == [{"type": "presence", "users": [{"user_id": "alice", "status": "online"}]}]
    assert list(presence.flush_in_parts()) == []  # nothing changed since: nothing sent
