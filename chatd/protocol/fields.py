"""Wire protocol v1: the field types, static ceilings and configurable limits that
every frame schema in :mod:`chatd.protocol.messages` is built from.

Plain data only: no I/O.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta, Struct

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)

# --- static ceilings (part of protocol v1; configuration cannot raise them) ----

INT64_MAX = 2**63 - 1
MAX_ID_CHARS = 64  # request ids (str form), user ids, client ids
MAX_TOKEN_CHARS = 8192
MAX_CLIENT_INFO_CHARS = 64  # hello.client / hello.device
MAX_TITLE_CHARS = 200
MAX_BODY_CHARS_CEILING = 65536  # limits.max_body_chars may not exceed it
MAX_EMOJI_BYTES = 32  # UTF-8 bytes; checked in codec.check_limits
MAX_CREATE_MEMBERS = 1000
MAX_PRESENCE_USER_IDS = 500
MAX_SYNC_ROOMS = 10000

# --- field types -----------------------------------------------------------------

RequestId = Union[
    Annotated[int, Meta(ge=0)],  # uint64: msgpack cannot carry more
    Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)],
]
UserId = Annotated[
    str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9_.@:-]+\Z")
]
RoomId = Annotated[int, Meta(gt=0, le=INT64_MAX)]
Seq = Annotated[int, Meta(ge=0, le=INT64_MAX)]  # a position; 0 = "before the first event"
EventSeq = Annotated[int, Meta(ge=1, le=INT64_MAX)]  # names an existing event
# Text that is stored or logged: PostgreSQL text cannot hold NUL, so it is refused here, by name,
# instead of failing the statement (and with it every other send of its batch).
NO_NUL = r"\A[^\x00]*\Z"
ClientId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=NO_NUL)]
Token = Annotated[str, Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]
ClientInfo = Annotated[str, Meta(max_length=MAX_CLIENT_INFO_CHARS, pattern=NO_NUL)]
Title = Annotated[str, Meta(min_length=1, max_length=MAX_TITLE_CHARS, pattern=NO_NUL)]
Body = Annotated[str, Meta(min_length=1, max_length=MAX_BODY_CHARS_CEILING, pattern=NO_NUL)]
# The limit is on UTF-8 bytes: codec.check_limits enforces it (Meta counts code points).
Emoji = Annotated[str, Meta(min_length=1, pattern=NO_NUL)]
PageLimit = Annotated[int, Meta(ge=1, le=INT64_MAX)]

Role = Literal["owner", "admin", "member"]
RoomKind = Literal["dm", "group"]
SetStatus = Literal["online", "away", "invisible"]
PresenceStatus = Literal["online", "away", "offline"]
EventKind = Literal[
    "message", "edited", "deleted", "reaction_added", "reaction_removed",
    "member_joined", "member_left", "role_changed", "room_created", "room_updated",
]  # fmt: skip
EVENT_KINDS: frozenset[str] = frozenset(EventKind.__args__)  # type: ignore[attr-defined]


# --- limits (configuration, advertised in welcome) --------------------------------


class Limits(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Server limits: built once from config, checked by the codec, sent in welcome.

    Raises ``ValueError`` on construction when a value is out of range.
    """

    max_frame_bytes: int = 262144
    max_body_chars: int = 4000
    max_title_chars: int = MAX_TITLE_CHARS
    history_page_max: int = 100
    sync_page_max: int = 100
    sync_gap_max: int = 1000  # a room further behind than this gets a snapshot
    typing_ttl_ms: int = 6000
    max_reactions_per_message: int = 50  # distinct emoji on one message
    max_room_members: int = 10000
    max_presence_subscriptions: int = 500  # per connection
    commands_per_second: float = 50.0  # sustained rate per connection before rate_limited
    command_burst: int = 200  # commands allowed at once above that rate

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1")
        if self.max_body_chars > MAX_BODY_CHARS_CEILING:
            raise ValueError(f"limits.max_body_chars must be <= {MAX_BODY_CHARS_CEILING}")
        if self.max_title_chars > MAX_TITLE_CHARS:
            raise ValueError(f"limits.max_title_chars must be <= {MAX_TITLE_CHARS}")
        if self.max_frame_bytes < 4096:
            raise ValueError("limits.max_frame_bytes must be >= 4096")
