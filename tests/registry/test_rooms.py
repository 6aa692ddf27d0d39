"""Room fan-out as plain function calls: who receives what, and how many writes."""

from chatd.domain.model import RoomEvent
from chatd.registry.rooms import Rooms
from chatd.registry.sessions import Session


class Outbox:
    def __init__(self):
        self.writes: list[bytes] = []

    def deliver(self, frame: bytes) -> bool:
        self.writes.append(frame)
        return True


def encode(obj: dict) -> bytes:
    return f"[{obj['room_id']}:{obj['seq']}]".encode()


def session(rooms: Rooms, user: str, room_ids=()) -> tuple[Session, Outbox]:
    box = Outbox()
    s = Session(user, box)
    s.release()
    rooms.attach(s, room_ids)
    return s, box


def msg(room, seq):
    return RoomEvent(room, seq, "message", "alice", 0.0, {"body": "x"})


def test_a_batch_of_one_rooms_messages_is_one_write_per_recipient():
    rooms = Rooms(encode)
    _, a = session(rooms, "alice", [1])
    _, b = session(rooms, "bob", [1, 2])
    rooms.publish([msg(1, 5), msg(1, 6), msg(1, 7), msg(2, 3)])
    assert a.writes == [b"[1:5][1:6][1:7]"]
    assert b.writes == [b"[1:5][1:6][1:7]", b"[2:3]"]
    assert rooms.deliveries == 7  # events delivered, not writes


def test_membership_changes_split_the_run_so_nobody_sees_more_or_less():
    rooms = Rooms(encode)
    _, a = session(rooms, "alice", [1])
    _, b = session(rooms, "bob", [1])
    _, c = session(rooms, "carol", [])
    left = RoomEvent(1, 7, "member_left", "alice", 0.0, {"user_id": "bob", "removed": True, "by": "alice"})
    joined = RoomEvent(1, 9, "member_joined", "alice", 0.0, {"user_id": "carol", "role": "member", "by": "alice"})
    rooms.publish([msg(1, 6), left, msg(1, 8), joined, msg(1, 10)])
    assert a.writes == [b"[1:6][1:7]", b"[1:8]", b"[1:9][1:10]"]
    assert b.writes == [b"[1:6][1:7]"]  # up to their own removal, then nothing
    assert c.writes == [b"[1:9][1:10]"]  # from their join on


def test_a_new_rooms_whole_creation_is_one_write_per_member():
    rooms = Rooms(encode)
    boxes = [session(rooms, user, [])[1] for user in ("alice", "bob", "carol")]
    created = RoomEvent(4, 1, "room_created", "alice", 0.0, {"title": "t", "kind": "group"})
    joins = [RoomEvent(4, seq, "member_joined", "alice", 0.0, {"user_id": u, "role": "member"})
             for seq, u in ((2, "alice"), (3, "bob"), (4, "carol"))]
    rooms.publish([created, *joins])
    assert all(box.writes == [b"[4:1][4:2][4:3][4:4]"] for box in boxes)


def joined(room, seq, user):
    return RoomEvent(room, seq, "member_joined", "alice", 0.0, {"user_id": user})


def test_changed_since_tells_an_opening_session_whether_it_may_have_missed_something():
    from chatd.registry.rooms import RECENT_PUBLISHES

    rooms = Rooms(encode)
    start = rooms.generation
    assert not rooms.changed_since(start, "bob", {1: 5})  # nothing published
    rooms.publish([msg(1, 5), msg(2, 9)])
    assert not rooms.changed_since(start, "bob", {1: 5})  # seen by the read; room 2 is not bob's
    assert rooms.changed_since(start, "bob", {1: 4})  # seq 5 went out after the read
    rooms.publish([joined(3, 2, "bob")])
    assert rooms.changed_since(start, "bob", {1: 5})  # bob was added somewhere
    assert not rooms.changed_since(start, "carol", {1: 5})
    later = rooms.generation
    for seq in range(10, 10 + RECENT_PUBLISHES + 1):
        rooms.publish([msg(2, seq)])
    assert rooms.changed_since(later, "carol", {1: 5})  # too long ago to tell: read again
    assert not rooms.changed_since(rooms.generation, "carol", {1: 5})
