"""The python-socketio peer: the same room work as the Node peers, on asyncio + aiohttp.

WebSocket transport only, JSON packets, rooms and the recent-event log in memory (not
durable: chatd commits every send to PostgreSQL before acking it). A room broadcast is
``sio.emit("event", ..., room=...)``.
"""

import argparse
import base64
import hashlib
import hmac
import inspect
import json
import signal
import sys
import time

import socketio
from aiohttp import web


def verify(token, secret):
    """HS256 signature and `exp`, as chatd checks them; the subject or None."""
    try:
        head, body, sig = str(token).split(".")
    except ValueError:
        return None
    want = base64.urlsafe_b64encode(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()).rstrip(b"=")
    if not hmac.compare_digest(want, sig.encode()):
        return None
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    sub = claims.get("sub")
    return sub if isinstance(sub, str) and claims.get("exp", 0) > time.time() else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", required=True)
    opts = p.parse_args()
    sio = socketio.AsyncServer(async_mode="aiohttp", transports=["websocket"], cors_allowed_origins=None, max_http_buffer_size=262144)
    app = web.Application()
    sio.attach(app)
    users = {}  # sid -> user
    sids = {}  # user -> set(sid)
    rooms = {}  # room id -> {"members": set(user), "seq": int, "log": [event]}
    dms = {}
    user_rooms = {}  # user -> set(room id), so a reconnecting client is back in its rooms
    next_id = [1]

    async def create(members):
        room_id = next_id[0]
        next_id[0] += 1
        rooms[room_id] = {"members": set(members), "seq": 0, "log": []}
        for user in members:
            user_rooms.setdefault(user, set()).add(room_id)
        for user in members:
            for sid in list(sids.get(user, ())):
                entered = sio.enter_room(sid, f"r{room_id}")
                if inspect.isawaitable(entered):  # a coroutine in python-socketio >= 5.12
                    await entered
        return room_id

    @sio.event
    async def connect(sid, environ, auth):
        user = verify((auth or {}).get("token"), opts.secret)
        if user is None:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        users[sid] = user
        sids.setdefault(user, set()).add(sid)
        for room_id in user_rooms.get(user, ()):
            entered = sio.enter_room(sid, f"r{room_id}")
            if inspect.isawaitable(entered):
                await entered

    @sio.event
    async def disconnect(sid, *args):
        user = users.pop(sid, None)
        if user is not None:
            sids.get(user, set()).discard(sid)

    @sio.on("create_group")
    async def create_group(sid, cmd):
        members = [users[sid], *cmd.get("members", [])]
        return {"room": {"room_id": await create(members), "kind": "group", "title": cmd.get("title", ""), "member_count": len(members)}}

    @sio.on("create_dm")
    async def create_dm(sid, cmd):
        a, b = users[sid], cmd["user_id"]
        key = (a, b) if a < b else (b, a)
        if key not in dms:
            dms[key] = await create([a, b])
        return {"room": {"room_id": dms[key], "kind": "dm", "title": "", "member_count": 2, "peer": b}}

    @sio.on("send")
    async def send(sid, cmd):
        room = rooms.get(cmd.get("room_id"))
        user = users[sid]
        if room is None or user not in room["members"]:
            return {"error": "not_found"}
        room["seq"] += 1
        event = {"type": "event", "room_id": cmd["room_id"], "seq": room["seq"], "kind": "message", "sender": user,
                 "at": time.time(), "data": {"body": cmd["body"]}}
        room["log"].append(event)
        del room["log"][:-100]
        await sio.emit("event", event, room=f"r{cmd['room_id']}")
        return {"seq": event["seq"], "at": event["at"], "duplicate": False}

    @sio.on("typing")
    async def typing(sid, cmd):
        frame = {"type": "typing", "room_id": cmd["room_id"], "user_id": users[sid], "active": bool(cmd.get("active"))}
        await sio.emit("typing", frame, room=f"r{cmd['room_id']}", skip_sid=sid)
        return {}

    @sio.on("subscribe_presence")
    async def subscribe_presence(sid, cmd):
        ids = cmd.get("user_ids") or []
        for user in ids:
            entered = sio.enter_room(sid, f"p:{user}")
            if inspect.isawaitable(entered):
                await entered
        return {"presence": [{"user_id": u, "status": "online" if sids.get(u) else "offline"} for u in ids]}

    @sio.on("set_presence")
    async def set_presence(sid, cmd):
        status = "offline" if cmd.get("status") == "invisible" else cmd.get("status")
        await sio.emit("presence", {"type": "presence", "users": [{"user_id": users[sid], "status": status}]}, room=f"p:{users[sid]}")
        return {}

    @sio.on("ping")
    async def ping(sid, cmd=None):
        return {"now": time.time()}

    @sio.on("sync")
    async def sync(sid, cmd):
        out = []
        for key, seq in (cmd.get("rooms") or {}).items():
            room = rooms.get(int(key))
            if room is None or users[sid] not in room["members"]:
                continue
            events = [e for e in room["log"] if e["seq"] > seq]
            if events:
                out.append({"room_id": int(key), "events": events, "has_more": False, "too_far_behind": False})
        return {"rooms": out, "removed": [], "added": []}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"event": "ready", "port": opts.port}), flush=True)
    web.run_app(app, host="127.0.0.1", port=opts.port, backlog=4096, print=None, access_log=None)


if __name__ == "__main__":
    main()
