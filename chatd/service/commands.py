"""Command handlers: validate -> authorize -> store -> fan-out.

``dispatch(service, session, cmd)`` returns the result body for commands
answered at once, or ``PENDING`` for durable commands: those are queued on the
group-commit writer and answered from its completion callback, so the
connection's reader keeps reading while the commit happens (replies are matched
to commands by request id, not by order).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from chatd import errors
from chatd.protocol import codec
from chatd.protocol import messages as m
from chatd.registry.sessions import Session
from chatd.service.runtime import Service, frame, summary
from chatd.store import membership as ms
from chatd.store import mutations as mu
from chatd.store import reads

PENDING = object()


def _reply(service: Service, session: Session, request_id: Any, after: Callable[[Any], None] | None = None) -> mu.Done:
    def done(result: Any, error: errors.ChatdError | None) -> None:
        if error is not None:
            service.command_errors[error.code] += 1
            session.deliver(frame(codec.encode_error(request_id, error)))
            return
        if after is not None:
            after(result)
        session.deliver(frame(codec.encode_result(request_id, result)))

    return done


def _submit(service: Service, session: Session, cmd: m.Command, mutation: mu.Mutation, after=None) -> object:
    if service.draining:
        raise errors.Unavailable("server is draining: reconnect and retry", retry_after=1.0)
    mutation.on_done = _reply(service, session, cmd.id, after)
    service.writer.submit(mutation)
    return PENDING


# --- durable commands ----------------------------------------------------------------


def send(service: Service, session: Session, cmd: m.Send) -> object:
    return _submit(service, session, cmd, mu.Send(
        user_id=session.user_id, client_id=cmd.client_msg_id, room_id=cmd.room_id, body=cmd.body, reply_to=cmd.reply_to
    ))


def edit(service: Service, session: Session, cmd: m.Edit) -> object:
    return _submit(service, session, cmd, mu.Edit(
        user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, seq=cmd.seq, body=cmd.body
    ))


def delete(service: Service, session: Session, cmd: m.Delete) -> object:
    return _submit(service, session, cmd, mu.Delete(user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, seq=cmd.seq))


def react(service: Service, session: Session, cmd: m.React | m.Unreact) -> object:
    return _submit(service, session, cmd, mu.React(
        user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, seq=cmd.seq, emoji=cmd.emoji,
        add=isinstance(cmd, m.React), max_reactions=service.config.limits.max_reactions_per_message,
    ))


def mark_read(service: Service, session: Session, cmd: m.MarkRead) -> object:
    mutation = mu.MarkRead(user_id=session.user_id, client_id="", room_id=cmd.room_id, seq=cmd.seq)

    def receipt(result: dict[str, Any]) -> None:
        if mutation.advanced:
            service.presence.note_receipt(cmd.room_id, session.user_id, result["read_seq"], origin=session)

    return _submit(service, session, cmd, mutation, receipt)


def create_dm(service: Service, session: Session, cmd: m.CreateDm) -> object:
    return _submit(service, session, cmd, ms.CreateDm(user_id=session.user_id, client_id=cmd.client_id, other=cmd.user_id))


def create_group(service: Service, session: Session, cmd: m.CreateGroup) -> object:
    return _submit(service, session, cmd, ms.CreateGroup(
        user_id=session.user_id, client_id=cmd.client_id, title=cmd.title, members=list(cmd.members), public=cmd.public,
        max_members=service.config.limits.max_group_members,
    ))


def join(service: Service, session: Session, cmd: m.Join) -> object:
    return _submit(service, session, cmd, ms.Join(user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id))


def leave(service: Service, session: Session, cmd: m.Leave) -> object:
    return _submit(service, session, cmd, ms.Leave(user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id))


def add_member(service: Service, session: Session, cmd: m.AddMember) -> object:
    return _submit(service, session, cmd, ms.AddMember(
        user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, target=cmd.user_id, role=cmd.role,
        max_members=service.config.limits.max_group_members,
    ))


def remove_member(service: Service, session: Session, cmd: m.RemoveMember) -> object:
    return _submit(service, session, cmd, ms.RemoveMember(user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, target=cmd.user_id))


def set_role(service: Service, session: Session, cmd: m.SetRole) -> object:
    return _submit(service, session, cmd, ms.SetRole(
        user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, target=cmd.user_id, role=cmd.role
    ))


def update_room(service: Service, session: Session, cmd: m.UpdateRoom) -> object:
    return _submit(service, session, cmd, ms.UpdateRoom(user_id=session.user_id, client_id=cmd.client_id, room_id=cmd.room_id, title=cmd.title))


# --- ephemeral commands --------------------------------------------------------------


def typing(service: Service, session: Session, cmd: m.Typing) -> dict[str, Any]:
    if cmd.room_id not in session.rooms:
        raise errors.NotFound("no such room", room_id=cmd.room_id)  # invisible rooms do not exist
    service.typing.update(cmd.room_id, session, cmd.active)
    return {}


def set_presence(service: Service, session: Session, cmd: m.SetPresence) -> dict[str, Any]:
    session.status = cmd.status
    service.presence.recompute(session.user_id)
    return {}


async def subscribe_presence(service: Service, session: Session, cmd: m.SubscribePresence) -> dict[str, Any]:
    users = list(dict.fromkeys(cmd.user_ids))
    limit = service.limits.max_presence_subscriptions
    if len(set(session.watching).union(users)) > limit:
        raise errors.TooLarge("too many presence subscriptions", field="$.user_ids", max=limit, unit="items")
    visible = set(await reads.room_mates(service.pool, session.user_id, users))
    service.presence.subscribe(session, [u for u in users if u in visible])
    missing = [u for u in visible if u not in service.presence.status and u not in service.presence.last_seen]
    if missing:
        for user_id, last_seen in (await reads.last_seen(service.pool, missing)).items():
            service.presence.last_seen.setdefault(user_id, last_seen)
    return {"presence": [service.presence.info(u) if u in visible else {"user_id": u, "status": "offline"} for u in users]}


def unsubscribe_presence(service: Service, session: Session, cmd: m.UnsubscribePresence) -> dict[str, Any]:
    service.presence.unsubscribe(session, cmd.user_ids)
    return {}


def ping(service: Service, session: Session, cmd: m.Ping) -> dict[str, Any]:
    return {"now": time.time()}


# --- reads ---------------------------------------------------------------------------


async def history(service: Service, session: Session, cmd: m.History) -> dict[str, Any]:
    member = await reads.membership(service.pool, cmd.room_id, session.user_id)
    limit = cmd.limit or service.limits.history_page_max
    events, more = await reads.page(
        service.pool, cmd.room_id, after=cmd.after, before=cmd.before, floor=member["joined_seq"], limit=limit
    )
    return {"events": [e.wire() for e in events], "has_more": more}


async def sync(service: Service, session: Session, cmd: m.Sync) -> dict[str, Any]:
    """Missed events per listed room; a snapshot when a room is too far behind (or the
    client claims a seq past the room's end); removed and added rooms."""
    limit = cmd.limit or service.limits.sync_page_max
    summaries, pages = await service.syncs.read((session.user_id, cmd.rooms, limit))
    current = {r["room_id"]: r for r in summaries}
    rooms, removed = [], []
    for room_id, have in sorted(cmd.rooms.items()):
        row = current.get(room_id)
        if row is None:
            removed.append(room_id)
            continue
        last, floor = row["last_seq"], row["joined_seq"]
        if have == last:
            continue  # nothing new
        if have > last or last - max(have, floor - 1) > service.limits.sync_gap_max:
            snap = await reads.room_snapshot(service.pool, room_id, session.user_id, floor=floor, latest=limit)
            rooms.append({"room_id": room_id, "events": [], "has_more": False, "too_far_behind": True, "snapshot": snap})
            continue
        events, more = pages.get(room_id, ([], False))
        if events or more:
            rooms.append({"room_id": room_id, "events": [e.wire() for e in events], "has_more": more, "too_far_behind": False})
    added = [summary(r) for rid, r in current.items() if rid not in cmd.rooms]
    return {"rooms": rooms, "removed": removed, "added": added}


async def refresh(service: Service, session: Session, cmd: m.Refresh) -> dict[str, Any]:
    identity = await service.authenticate(cmd.token)
    if identity.user_id != session.user_id:
        raise errors.Forbidden("a refreshed token must be for the same user")
    session.expire_at(identity.expires_at, service.config.auth.leeway)
    return {"token_expires_at": identity.expires_at}


def hello_again(service: Service, session: Session, cmd: m.Hello) -> dict[str, Any]:
    raise errors.Conflict("hello was already accepted on this connection")


HANDLERS: dict[type, Callable] = {
    m.Send: send, m.Edit: edit, m.Delete: delete, m.React: react, m.Unreact: react, m.MarkRead: mark_read,
    m.CreateDm: create_dm, m.CreateGroup: create_group, m.Join: join, m.Leave: leave,
    m.AddMember: add_member, m.RemoveMember: remove_member, m.SetRole: set_role, m.UpdateRoom: update_room,
    m.Typing: typing, m.SetPresence: set_presence, m.SubscribePresence: subscribe_presence,
    m.UnsubscribePresence: unsubscribe_presence, m.Ping: ping, m.History: history, m.Sync: sync,
    m.Refresh: refresh, m.Hello: hello_again,
}  # fmt: skip
ASYNC_HANDLERS = {history, sync, refresh, subscribe_presence}
