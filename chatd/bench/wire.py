"""What the loader puts on and reads off the wire: client WebSocket frames and two dialects.

``chatd``  chatd protocol v1 (docs/protocol.md): binary frames, one MessagePack map each.
           The Node ``ws`` peer speaks the same subset, so one dialect drives both.
``sio``    Socket.IO 5 over Engine.IO 4, WebSocket transport only: text frames such as
           ``42<ack>["send",{...}]``; used for the Node Socket.IO and python-socketio peers.

Every message the bench sends has the body ``"L" + 19 digits`` of ``time.monotonic_ns()``
(CLOCK_MONOTONIC, one clock for every process on the machine), so a receiver finds
deliveries and their send time with one bytes search per socket read, without decoding
frames: ``MARK`` counts them, ``STAMP`` extracts the timestamps.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import Any

import msgpack

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA

MARKS = {"chatd": b"\xa4body\xb4L", "sio": b'"body":"L'}
STAMPS = {
    "chatd": re.compile(rb"\xa4body\xb4L(\d{19})"),
    "sio": re.compile(rb'"body":"L(\d{19})"'),
}
# Length of a whole stamp match (mark + 19 digits, + the closing quote for sio).
STAMP_LENS = {"chatd": 26, "sio": 29}
TAIL = 40  # bytes of a stream kept between reads: longer than any stamp match or close frame head
EIO_PING = b"\x81\x012"  # an unmasked Engine.IO ping text frame "2"


def body(now_ns: int) -> str:
    return "L%019d" % now_ns


# --- client frames (masked, RFC 6455 §5.3) ------------------------------------------------


class Masker:
    """Masks client payloads with one fixed random key per loader (servers must unmask it all the same)."""

    def __init__(self) -> None:
        self.key = os.urandom(4)
        self._key_int = {}

    def frame(self, opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = bytes((0x80 | opcode, 0x80 | n))
        elif n < 65536:
            head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
        mask = self._key_int.get(n)
        if mask is None:
            mask = int.from_bytes((self.key * ((n >> 2) + 1))[:n], "little")
            if len(self._key_int) < 4096:
                self._key_int[n] = mask
        masked = (int.from_bytes(payload, "little") ^ mask).to_bytes(n, "little")
        return head + self.key + masked


def upgrade_request(host: str, port: int, path: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def parse_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete unmasked server frames in ``buf`` and the unparsed rest (fragments are not expected)."""
    out = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        b0, n = buf[pos], buf[pos + 1] & 0x7F
        start = pos + 2
        if n == 126:
            if end - pos < 4:
                break
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            start = pos + 10
        stop = start + n
        if stop > end:
            break
        out.append((b0 & 0x0F, buf[start:stop]))
        pos = stop
    return out, buf[pos:]


def close_code(payload: bytes) -> int:
    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005


def find_close(tail: bytes) -> int | None:
    """The close code of a server close frame near the end of a stream, if one is there."""
    at = tail.rfind(b"\x88")
    while at >= 0:
        if at + 4 <= len(tail) and 2 <= tail[at + 1] <= 125:
            return close_code(tail[at + 2 : at + 4])
        at = tail.rfind(b"\x88", 0, at)
    return None


# --- dialects ----------------------------------------------------------------------------


class ChatdDialect:
    name = "chatd"
    opcode = OP_BINARY

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self.packb = msgpack.packb

    def path(self, path: str) -> str:
        return path

    def on_open(self, token: str, rid: int) -> bytes:
        """What to send right after the 101 (chatd: hello)."""
        return self.masker.frame(OP_BINARY, self.packb({"type": "hello", "id": rid, "version": 1, "token": token, "client": "chatd-bench"}))

    def command(self, rid: int, cmd: dict[str, Any]) -> bytes:
        cmd = dict(cmd, id=rid)
        kind = cmd["type"]
        if kind in ("create_group", "create_dm", "add_member", "join", "leave") and "client_id" not in cmd:
            cmd["client_id"] = f"b{os.getpid()}-{rid}"
        return self.masker.frame(OP_BINARY, self.packb(cmd))

    def send(self, rid: int, room_id: int, text: str) -> bytes:
        return self.masker.frame(OP_BINARY, self.packb(
            {"type": "send", "id": rid, "room_id": room_id, "client_msg_id": f"{os.getpid()}-{rid}", "body": text}
        ))

    @staticmethod
    def live_event(payload: bytes) -> bool:
        """True unless the frame is a reply (a sync or history result also carries stamps)."""
        return b"\xa4type\xa6result" not in payload[:24]

    def reply(self, opcode: int, payload: bytes) -> tuple[str, Any, Any] | None:
        """``(kind, rid, body)`` for replies and handshake steps; None for anything else.

        kind: "ok", "error" (body: the error code), "ping" (a server ping to answer).
        """
        if opcode != OP_BINARY:
            return ("ping", None, payload) if opcode == OP_PING else None
        head = payload[:16]  # chatd writes `type` first: skip events, typing, presence without decoding
        if b"\xa6result" not in head and b"\xa5error" not in head and b"\xa7welcome" not in head:
            return None
        msg = msgpack.unpackb(payload, strict_map_key=False)
        kind = msg.get("type")
        if kind in ("result", "welcome"):
            return "ok", msg.get("id"), msg
        if kind == "error":
            return "error", msg.get("id"), msg.get("code", "error")
        return None

    def pong(self, payload: bytes) -> bytes:
        return self.masker.frame(OP_PONG, payload)


class SioDialect:
    """Socket.IO 5 / Engine.IO 4 text packets over the WebSocket transport."""

    name = "sio"
    opcode = OP_TEXT

    def __init__(self, masker: Masker) -> None:
        self.masker = masker
        self.token_for: dict[int, str] = {}

    def path(self, path: str) -> str:
        return "/socket.io/?EIO=4&transport=websocket"

    def on_open(self, token: str, rid: int) -> bytes:
        # Engine.IO sends its open packet first; the namespace connect goes out when it arrives.
        self.token_for[rid] = token
        return b""

    def command(self, rid: int, cmd: dict[str, Any]) -> bytes:
        args = {k: v for k, v in cmd.items() if k != "type"}
        text = "42%d%s" % (rid, json.dumps([cmd["type"], args], separators=(",", ":")))
        return self.masker.frame(OP_TEXT, text.encode())

    def send(self, rid: int, room_id: int, text: str) -> bytes:
        return self.masker.frame(OP_TEXT, b'42%d["send",{"room_id":%d,"body":"%s"}]' % (rid, room_id, text.encode()))

    @staticmethod
    def live_event(payload: bytes) -> bool:
        return payload[:2] == b"42"

    def reply(self, opcode: int, payload: bytes) -> tuple[str, Any, Any] | None:
        if opcode != OP_TEXT:
            return ("ping", None, payload) if opcode == OP_PING else None
        head = payload[:2]
        if head == b"43":
            at = payload.index(b"[")
            rid = int(payload[2:at])
            body = json.loads(payload[at:])[0] if len(payload) > at + 2 else {}
            if isinstance(body, dict) and body.get("error"):
                return "error", rid, body["error"]
            return "ok", rid, body
        if payload == b"2":
            return "eio_ping", None, None
        if head == b"0{":
            return "eio_open", None, None
        if head == b"40":
            return "ok", "connect", json.loads(payload[2:] or b"{}")
        if head == b"44":
            return "error", "connect", "unauthorized"
        return None

    def connect_packet(self, token: str) -> bytes:
        return self.masker.frame(OP_TEXT, b'40{"token":"%s"}' % token.encode())

    def eio_pong(self) -> bytes:
        return self.masker.frame(OP_TEXT, b"3")

    def pong(self, payload: bytes) -> bytes:
        return self.masker.frame(OP_PONG, payload)


def dialect(name: str, masker: Masker):
    return {"chatd": ChatdDialect, "sio": SioDialect}[name](masker)
