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
    assert a.writes == [b"[1:6]", b"[1:7]", b"[1:8]", b"[1:9]", b"[1:10]"]
    assert b.writes == [b"[1:6]", b"[1:7]"]  # their own removal, then nothing
    assert c.writes == [b"[1:9]", b"[1:10]"]  # from their join on
