"""Pure tests: per-room positions, sync interpretation, error-frame mapping."""

from __future__ import annotations

from chatd import errors
from chatd.client import Timeline, error_from_frame
from chatd.client.timeline import Verdict


def ev(room: int, seq: int, kind: str = "message") -> dict:
    return {"type": "event", "room_id": room, "seq": seq, "kind": kind, "sender": "a", "at": 1.0, "data": {}}


def test_classify_dedupes_and_spots_gaps():
    timeline = Timeline({7: 3})
    assert timeline.classify(ev(7, 3)) is Verdict.DUPLICATE
    assert timeline.classify(ev(7, 4)) is Verdict.NEXT
    assert timeline.classify(ev(7, 6)) is Verdict.GAP
    assert timeline.classify(ev(8, 1)) is Verdict.NEXT  # unknown room: from the start
    assert timeline.classify({"type": "typing", "room_id": 7}) is Verdict.OTHER
    timeline.advance(ev(7, 6))
    timeline.advance(ev(7, 5))  # never moves backwards
    assert timeline.positions() == {7: 6}


def test_unseeded_timeline_starts_from_the_welcome():
    timeline = Timeline()
    assert not timeline.seeded
    timeline.seed_from_welcome({"rooms": [{"room_id": 1, "last_seq": 40}, {"room_id": 2, "last_seq": 3}]})
    assert timeline.seeded and timeline.positions() == {1: 40, 2: 3}


def test_sync_result_gives_new_events_snapshots_removed_and_asks_again():
    timeline = Timeline({1: 2, 2: 5, 3: 9, 4: 1})
    items, again = timeline.apply_sync({
        "rooms": [
            {"room_id": 1, "events": [ev(1, 2), ev(1, 3), ev(1, 4)], "has_more": True, "too_far_behind": False},
            {"room_id": 4, "events": [], "has_more": False, "too_far_behind": True,
             "snapshot": {"last_seq": 5000, "room": {}, "members": [], "latest": [ev(4, 5000)]}},
        ],
        "removed": [3],
        "added": [{"room_id": 9, "joined_seq": 12, "last_seq": 20}],
    })  # fmt: skip
    assert [(i["type"], i["room_id"], i.get("seq")) for i in items] == [
        ("event", 1, 3), ("event", 1, 4), ("snapshot", 4, None), ("removed", 3, None),
    ]  # fmt: skip
    assert again  # room 1 has more, room 9 is new
    assert timeline.positions() == {1: 4, 2: 5, 4: 5000, 9: 11}


def test_sync_result_with_nothing_new_ends_the_catch_up():
    timeline = Timeline({1: 4})
    assert timeline.apply_sync({"rooms": [], "removed": [], "added": []}) == ([], False)


def test_error_frames_map_to_chatd_errors():
    not_found = error_from_frame({"type": "error", "id": 3, "code": "not_found", "message": "no room", "details": {}})
    assert isinstance(not_found, errors.NotFound) and not_found.request_id == 3 and not_found.message == "no room"
    limited = error_from_frame({"type": "error", "id": 4, "code": "rate_limited", "message": "", "details": {"retry_after": 0.25}})
    assert isinstance(limited, errors.RateLimited) and limited.retry_after == 0.25
    down = error_from_frame({"type": "error", "id": 5, "code": "unavailable", "message": "db", "details": {}})
    assert isinstance(down, errors.Unavailable) and down.retry_after == 1.0
    odd = error_from_frame({"type": "error", "id": None, "code": "from_the_future", "message": "?", "details": {"x": 1}})
    assert type(odd) is errors.Internal and odd.wire_code == "from_the_future" and odd.details == {"x": 1}
    expired = error_from_frame({"type": "error", "id": 1, "code": "token_expired", "message": "", "details": {}})
    assert isinstance(expired, errors.TokenExpired) and isinstance(expired, errors.Unauthorized)
