"""Wire protocol v1: the typed shape of every frame (see docs/protocol.md).

Client -> server frames are *commands*: a msgspec tagged union on ``"type"``
(:data:`AnyCommand`). They are decoded strictly (unknown fields are rejected)
so a developer learns about a typo at once; sizes and ranges that never change
are ``msgspec.Meta`` constraints here, limits that come from configuration are
checked by :func:`chatd.protocol.codec.check_limits`.

Server -> client frames are results, events and errors. They are encoded with
``omit_defaults`` (an optional field that is absent means "not set"); fields
a client must always see are declared without a default. Clients must ignore
fields and event kinds they do not know.

Imports nothing of chatd's I/O: plain data only.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Union

from msgspec import Meta, Struct

from chatd.protocol.fields import (  # noqa: F401 - re-exported: messages is the schema's one name
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    INT64_MAX,
    MAX_ID_CHARS,
    MAX_TOKEN_CHARS,
    MAX_CLIENT_INFO_CHARS,
    MAX_TITLE_CHARS,
    MAX_BODY_CHARS_CEILING,
    MAX_EMOJI_BYTES,
    MAX_CREATE_MEMBERS,
    MAX_PRESENCE_USER_IDS,
    MAX_SYNC_ROOMS,
    NO_NUL,
    RequestId,
    UserId,
    RoomId,
    Seq,
    EventSeq,
    ClientId,
    Token,
    ClientInfo,
    Title,
    Body,
    Emoji,
    PageLimit,
    Role,
    RoomKind,
    SetStatus,
    PresenceStatus,
    EventKind,
    EVENT_KINDS,
    Limits,
)

# --- commands (client -> server) ----------------------------------------------------


class Command(
    Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True, frozen=True, gc=False
):
    """Base of every command; ``id`` is echoed in the one reply."""

    id: RequestId


class Hello(Command, tag="hello", kw_only=True):
    version: Annotated[int, Meta(ge=0, le=INT64_MAX)]
    token: Token
    client: ClientInfo | None = None
    device: ClientInfo | None = None


class Refresh(Command, tag="refresh", kw_only=True):
    token: Token


class CreateDm(Command, tag="create_dm", kw_only=True):
    user_id: UserId
    client_id: ClientId


class CreateGroup(Command, tag="create_group", kw_only=True):
    title: Title
    members: Annotated[list[UserId], Meta(max_length=MAX_CREATE_MEMBERS)] = []
    public: bool = False
    client_id: ClientId


class Join(Command, tag="join", kw_only=True):
    room_id: RoomId
    client_id: ClientId


class Leave(Command, tag="leave", kw_only=True):
    room_id: RoomId
    client_id: ClientId


class AddMember(Command, tag="add_member", kw_only=True):
    room_id: RoomId
    user_id: UserId
    role: Role = "member"
    client_id: ClientId


class RemoveMember(Command, tag="remove_member", kw_only=True):
    room_id: RoomId
    user_id: UserId
    client_id: ClientId


class SetRole(Command, tag="set_role", kw_only=True):
    room_id: RoomId
    user_id: UserId
    role: Role
    client_id: ClientId


class UpdateRoom(Command, tag="update_room", kw_only=True):
    room_id: RoomId
    title: Title
    client_id: ClientId


class Send(Command, tag="send", kw_only=True):
    room_id: RoomId
    client_msg_id: ClientId
    body: Body
    reply_to: EventSeq | None = None


class Edit(Command, tag="edit", kw_only=True):
    room_id: RoomId
    seq: EventSeq
    body: Body
    client_id: ClientId


class Delete(Command, tag="delete", kw_only=True):
    room_id: RoomId
    seq: EventSeq
    client_id: ClientId


class React(Command, tag="react", kw_only=True):
    room_id: RoomId
    seq: EventSeq
    emoji: Emoji
    client_id: ClientId


class Unreact(Command, tag="unreact", kw_only=True):
    room_id: RoomId
    seq: EventSeq
    emoji: Emoji
    client_id: ClientId


class MarkRead(Command, tag="mark_read", kw_only=True):
    room_id: RoomId
    seq: Seq


class Typing(Command, tag="typing", kw_only=True):
    room_id: RoomId
    active: bool


class SetPresence(Command, tag="set_presence", kw_only=True):
    status: SetStatus


class SubscribePresence(Command, tag="subscribe_presence", kw_only=True):
    user_ids: Annotated[list[UserId], Meta(max_length=MAX_PRESENCE_USER_IDS)]


class UnsubscribePresence(Command, tag="unsubscribe_presence", kw_only=True):
    user_ids: Annotated[list[UserId], Meta(max_length=MAX_PRESENCE_USER_IDS)]


class History(Command, tag="history", kw_only=True):
    room_id: RoomId
    before: Seq | None = None
    after: Seq | None = None
    limit: PageLimit | None = None  # after check_limits: always an int <= history_page_max


class Sync(Command, tag="sync", kw_only=True):
    rooms: Annotated[dict[RoomId, Seq], Meta(max_length=MAX_SYNC_ROOMS)] = {}
    limit: PageLimit | None = None  # per room; after check_limits: int <= sync_page_max


class Ping(Command, tag="ping", kw_only=True):
    pass


AnyCommand = Union[
    Hello, Refresh, CreateDm, CreateGroup, Join, Leave, AddMember, RemoveMember, SetRole,
    UpdateRoom, Send, Edit, Delete, React, Unreact, MarkRead, Typing, SetPresence,
    SubscribePresence, UnsubscribePresence, History, Sync, Ping,
]  # fmt: skip
COMMANDS: dict[str, type[Command]] = {
    cls.__struct_config__.tag: cls for cls in AnyCommand.__args__  # type: ignore[attr-defined]
}
# Durable commands: the server stores their client id for idempotency.
DURABLE_COMMANDS: frozenset[type[Command]] = frozenset(
    cls for cls in COMMANDS.values() if "client_id" in cls.__struct_fields__
) | {Send}


def client_key(cmd: Command) -> str | None:
    """The idempotency key of a durable command (``client_msg_id`` / ``client_id``), else None."""
    if type(cmd) is Send:
        return cmd.client_msg_id  # type: ignore[attr-defined,no-any-return]
    return getattr(cmd, "client_id", None)


# --- shared outgoing shapes ---------------------------------------------------------


class Out(Struct, omit_defaults=True, kw_only=True, gc=False):
    """Base of server -> client payloads: defaulted fields are omitted when unset."""


class UserInfo(Out, kw_only=True):
    id: str


class RoomSummary(Out, kw_only=True):
    """A room as one member sees it (welcome.rooms, sync.added)."""

    room_id: int
    kind: RoomKind
    title: str  # "" for DMs: show the peer instead
    role: Role
    public: bool
    last_seq: int
    read_seq: int
    unread: int  # message events by others with seq > read_seq (deleted ones count)
    joined_seq: int  # first seq this member may see (history stops there)
    peer: str | None = None  # DMs only: the other member


class RoomInfo(Out, kw_only=True):
    room_id: int
    kind: RoomKind
    title: str
    public: bool
    created_by: str
    created_at: float
    member_count: int
    last_seq: int
    peer: str | None = None  # DMs only: the other member, from the receiver's side


class MemberInfo(Out, kw_only=True):
    user_id: str
    role: Role
    joined_at: float


class PresenceInfo(Out, kw_only=True):
    user_id: str
    status: PresenceStatus
    last_seen: float | None = None  # offline users only, when known


# --- durable events ------------------------------------------------------------------


class Event(Out, tag_field="type", tag="event", frozen=True):
    """One entry of a room's log: the same shape live, in history and in sync.

    ``data`` is a ``*Data`` Struct below when the server builds the event (msgspec
    encodes by runtime type) and a plain dict when decoded. ``sender`` is the actor.
    """

    room_id: int
    seq: int
    kind: EventKind
    sender: str
    at: float
    data: Any


class MessageData(Out, kw_only=True):
    body: str | None = None  # absent once deleted
    reply_to: int | None = None
    edited: bool = False  # history/sync only: the current state of the message
    deleted: bool = False
    reactions: dict[str, list[str]] | None = None  # emoji -> user ids, in order


class EditedData(Out, kw_only=True):
    target_seq: int
    body: str


class DeletedData(Out, kw_only=True):
    target_seq: int


class ReactionData(Out, kw_only=True):  # reaction_added and reaction_removed
    target_seq: int
    emoji: str


class MemberJoinedData(Out, kw_only=True):
    user_id: str
    role: Role
    by: str | None = None  # present when someone else added the member


class MemberLeftData(Out, kw_only=True):
    user_id: str
    removed: bool
    by: str | None = None  # present when someone else removed the member


class RoleChangedData(Out, kw_only=True):
    user_id: str
    role: Role


class RoomCreatedData(Out, kw_only=True):
    title: str
    kind: RoomKind


class RoomUpdatedData(Out, kw_only=True):
    title: str


EVENT_DATA: dict[str, type[Out]] = {
    "message": MessageData,
    "edited": EditedData,
    "deleted": DeletedData,
    "reaction_added": ReactionData,
    "reaction_removed": ReactionData,
    "member_joined": MemberJoinedData,
    "member_left": MemberLeftData,
    "role_changed": RoleChangedData,
    "room_created": RoomCreatedData,
    "room_updated": RoomUpdatedData,
}


# --- ephemeral events (no seq, never stored) -------------------------------------------


class ReceiptEvent(Out, tag_field="type", tag="receipt"):
    room_id: int
    user_id: str
    read_seq: int


class TypingEvent(Out, tag_field="type", tag="typing"):
    room_id: int
    user_id: str
    active: bool


class PresenceEvent(Out, tag_field="type", tag="presence"):
    users: list[PresenceInfo]


class GoAway(Out, tag_field="type", tag="goaway"):
    reason: str
    reconnect_after_ms: int


EphemeralEvent = Union[ReceiptEvent, TypingEvent, PresenceEvent, GoAway]


# --- results (the reply to one command; codec adds "type" and "id") ---------------------


class Result(Out, kw_only=True):
    """Base of result payloads; ``reply_type`` is the frame's ``type``."""

    reply_type: ClassVar[str] = "result"


class Welcome(Result, kw_only=True):
    reply_type: ClassVar[str] = "welcome"
    session_id: str
    server: str
    protocol: int
    user: UserInfo
    limits: Limits
    rooms: list[RoomSummary]
    token_expires_at: float


class RefreshResult(Result, kw_only=True):
    token_expires_at: float


class RoomResult(Result, kw_only=True):  # create_dm, create_group
    room: RoomInfo


class JoinResult(Result, kw_only=True):
    room: RoomInfo
    seq: int


class SeqResult(Result, kw_only=True):
    """leave, add_member, remove_member, set_role, update_room, delete, react, unreact."""

    seq: int


class SendResult(Result, kw_only=True):
    seq: int
    at: float
    duplicate: bool


class EditResult(Result, kw_only=True):
    seq: int  # of the new "edited" event
    at: float


class ReadResult(Result, kw_only=True):
    read_seq: int


class EmptyResult(Result, kw_only=True):  # typing, set_presence, unsubscribe_presence
    pass


class PresenceResult(Result, kw_only=True):
    presence: list[PresenceInfo]


class HistoryResult(Result, kw_only=True):
    events: list[Event]
    has_more: bool


class RoomSnapshot(Out, kw_only=True):
    room: RoomInfo
    members: list[MemberInfo]
    last_seq: int
    latest: list[Event]  # the newest events (at most sync_page_max), ascending


class SyncRoom(Out, kw_only=True):
    room_id: int
    events: list[Event]
    has_more: bool
    too_far_behind: bool
    snapshot: RoomSnapshot | None = None  # present iff too_far_behind


class SyncResult(Result, kw_only=True):
    rooms: list[SyncRoom]
    removed: list[int]
    added: list[RoomSummary]


class PongResult(Result, kw_only=True):
    now: float
