"""The running service: writer, registry, presence, typing and token verification.

``open_service`` owns their background tasks in one nursery. Sessions are opened
and closed here; commands are dispatched by :mod:`chatd.service.commands`.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, AsyncIterator, Sequence

import trio

import chatd
from chatd import errors
from chatd.auth.tokens import Identity, TokenVerifier
from chatd.config import Config
from chatd.domain.model import RoomEvent
from chatd.protocol import codec, messages
from chatd.protocol.websocket import encode_binary
from chatd.registry.presence import Presence
from chatd.registry.rooms import Rooms
from chatd.registry.sessions import Session
from chatd.registry.typing import Typing
from chatd.service.hellos import HelloReads
from chatd.service.lastseen import LastSeenWrites
from chatd.service.maintenance import SearchIndexMerges
from chatd.service.shared import SharedReads
from chatd.store import reads
from chatd.store.pool import Pool
from chatd.store.writer import Writer


# Listed rooms one shared sync statement reads at most (a lone sync may list more).
SYNC_ROOMS_PER_READ = 2000


def _sync_weight(request: tuple[str, dict[int, int], int]) -> int:
    return len(request[1]) + 1


def frame(payload: bytes) -> bytes:
    """A WebSocket binary frame around an encoded MessagePack payload."""
    return encode_binary(payload)


def encode_server_event(obj: dict[str, Any]) -> bytes:
    return encode_binary(codec.encode_event(obj))


def limits_from(config: Config) -> messages.Limits:
    lim = config.limits
    return messages.Limits(
        max_frame_bytes=config.websocket.max_frame_bytes,
        max_body_chars=lim.max_body_chars,
        history_page_max=lim.history_page_max,
        sync_page_max=lim.sync_page_max,
        sync_gap_max=lim.retention_events,
        typing_ttl_ms=int(lim.typing_ttl * 1000),
        max_reactions_per_message=lim.max_reactions_per_message,
        max_room_members=lim.max_group_members,
        commands_per_second=lim.commands_per_second,
        command_burst=lim.command_burst,
    )


class Service:
    def __init__(self, config: Config, pool: Pool, verifier: TokenVerifier) -> None:
        self.config = config
        self.pool = pool
        self.verifier = verifier
        self.limits = limits_from(config)
        self.decoder = codec.CommandDecoder(self.limits)
        self.rooms = Rooms(encode_server_event)
        self.presence = Presence(self.rooms, encode_server_event, window=config.limits.presence_window)
        self.typing = Typing(self.rooms, encode_server_event, ttl=config.limits.typing_ttl)
        # The writer has connections of its own: a storm of reads (hellos, syncs,
        # history) must not make every durable write wait for a pooled connection.
        self.writer_pool = Pool(
            pool.conninfo,
            size=config.writer.pipeline,
            acquire_timeout=pool.acquire_timeout,
            connect_timeout=pool.connect_timeout,
            query_timeout=pool.query_timeout,
        )
        self.writer = Writer(
            self.writer_pool,
            max_batch=config.writer.max_batch,
            queue_size=config.writer.queue_size,
            publish=self.publish,
            pipeline=config.writer.pipeline,
            linger=config.writer.linger,
        )
        # Hellos that arrive together share one read (a reconnect storm is one statement
        # per batch, not per connection).
        self.hellos = HelloReads(pool)
        # So do the syncs of clients catching up together (after a network blip), up to
        # SYNC_ROOMS_PER_READ listed rooms in one statement.
        self.syncs = SharedReads(partial(reads.sync_pages_many, pool), what="syncs", weight=_sync_weight, max_weight=SYNC_ROOMS_PER_READ)
        # A disconnect storm is one last_seen statement per batch, not a pooled write each.
        self.last_seen = LastSeenWrites(pool, timeout=config.database.query_timeout)
        # New messages' search entries are merged here, not inside a send batch.
        self.search_merges = SearchIndexMerges(pool, interval=config.database.search_merge_interval)
        self.sessions: set[Session] = set()
        self.command_errors: Counter[str] = Counter()  # error frames answered, by code (/metrics)
        self.draining = False
        self.nursery: trio.Nursery | None = None

    # --- fan-out hook (called by the writer after COMMIT) ------------------------------

    def publish(self, events: Sequence[RoomEvent]) -> None:
        self.rooms.publish(events)
        # A new DM (room_created, then its two member_joined) makes its members
        # presence peers; a create_dm that failed created nothing and links no one.
        for i, event in enumerate(events):
            if event.kind == "room_created" and event.data.get("kind") == "dm":
                first, second = events[i + 1 : i + 3]
                self.presence.add_peers(first.data["user_id"], second.data["user_id"])

    # --- sessions ----------------------------------------------------------------------

    async def authenticate(self, token: str) -> Identity:
        """Raises errors.Unauthorized / TokenExpired / Unavailable (key fetch)."""
        return await self.verifier.verify(token)

    async def open_session(self, outbox: Any, identity: Identity, hello: messages.Hello) -> tuple[Session, messages.Welcome]:
        """Register a connection for ``identity``; returns the session and the welcome body.

        One read gives the user and their rooms; the session then receives live
        events. A room's event published between that read and the attach would
        be neither in the summary nor delivered, so in that (rare) case the rooms
        are read again, attached first this time: every event after a summary's
        last_seq is then delivered, at worst also counted in it (docs/protocol.md §9).
        """
        user_id = identity.user_id
        generation = self.rooms.generation
        disabled, summaries = await self.hellos.read(user_id)
        if disabled:
            raise errors.Forbidden("this account is disabled")
        session = Session(user_id, outbox, device=hello.device or "", expires_at=identity.expires_at)
        first = self.rooms.attach(session, [row["room_id"] for row in summaries])
        self.sessions.add(session)
        if self.rooms.changed_since(generation, user_id, {row["room_id"]: row["last_seq"] for row in summaries}):
            try:
                summaries = await reads.room_summaries(self.pool, user_id)
            except BaseException:
                await self.close_session(session)
                raise
            current = {row["room_id"] for row in summaries}
            for room_id in current - session.rooms:
                self.rooms.enter(session, room_id)
            for room_id in session.rooms - current:
                self.rooms.leave(session, room_id)
        if first:
            self.presence.set_peers(user_id, [row["peer"] for row in summaries if "peer" in row])
        self.presence.recompute(user_id)
        welcome = messages.Welcome(
            session_id=uuid.uuid4().hex,
            server=f"chatd/{chatd.__version__}",
            protocol=chatd.PROTOCOL_VERSION,
            user=messages.UserInfo(id=user_id),
            limits=self.limits,
            rooms=[summary(r) for r in summaries],
            token_expires_at=identity.expires_at,
        )
        return session, welcome

    async def close_session(self, session: Session) -> None:
        """Forget a session and end its typing; on the user's last one, record last_seen
        (written behind, see chatd/service/lastseen.py). Never waits."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.typing.clear_session(session)
        last = self.rooms.detach(session)
        self.presence.unsubscribe(session)
        self.presence.recompute(session.user_id)
        if last:
            self.last_seen.record(session.user_id, self.presence.last_seen.get(session.user_id) or time.time())

    async def drain(self) -> None:
        """Refuse new writes and wait until queued ones are committed and answered."""
        self.draining = True
        await self.writer.drain()


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """RoomSummary (docs/protocol.md §5.2) from a reads.room_summaries row."""
    keys = ("room_id", "kind", "title", "role", "public", "last_seq", "read_seq", "unread", "joined_seq", "peer")
    return {k: row[k] for k in keys if k in row}


@asynccontextmanager
async def open_service(config: Config, pool: Pool) -> AsyncIterator[Service]:
    verifier = TokenVerifier(config.auth)
    service = Service(config, pool, verifier)
    try:
        async with trio.open_nursery() as nursery:
            service.nursery = nursery
            await nursery.start(service.writer.serve)
            await nursery.start(service.hellos.serve)
            await nursery.start(service.syncs.serve)
            await nursery.start(service.last_seen.serve)
            await nursery.start(service.search_merges.serve)
            await nursery.start(service.presence.serve)
            await nursery.start(service.typing.serve)
            yield service
            nursery.cancel_scope.cancel()
    finally:
        await service.writer_pool.aclose()
        await verifier.aclose()
