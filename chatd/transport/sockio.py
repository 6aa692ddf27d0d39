"""Non-blocking socket calls on trio sockets without an await (trio's own are async).

The WebSocket write path calls ``send`` synchronously from ``deliver`` and the read
path tries ``recv`` before it waits for readability.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

import trio

RECEIVE_SIZE = 65536


def raw_send(sock: trio.socket.SocketType) -> Callable[[bytes], int]:
    """A synchronous non-blocking ``send`` for a trio socket (trio's own is async).

    We call the stdlib socket trio wraps (non-blocking: BlockingIOError when full).
    Unlike ``os.write(fd)``, at the same ~1.1 µs, it fails with EBADF once the socket
    is closed instead of writing into whichever socket reuses the descriptor number:
    a stream closed behind our back (``serve_tcp`` closes it after its handler) must
    never leak a frame to another user. ``_sock`` is private to trio but stable
    since 2017; without it we use ``os.write`` and re-check the descriptor per call.
    """
    raw = getattr(sock, "_sock", None)
    if isinstance(raw, socket.socket):
        return raw.send

    def send(data: bytes) -> int:
        fd = sock.fileno()
        if fd < 0:
            raise OSError(errno.EBADF, "socket is closed")
        return os.write(fd, data)

    return send


def raw_recv(sock: trio.socket.SocketType) -> bytes:
    """One non-blocking read of up to RECEIVE_SIZE bytes (BlockingIOError if none).

    From the stdlib socket trio wraps, as in ``raw_send``; without it, ``os.read``
    on a descriptor checked per call (-1 once closed, never a reused number).
    """
    raw = getattr(sock, "_sock", None)
    if isinstance(raw, socket.socket):
        return raw.recv(RECEIVE_SIZE)
    fd = sock.fileno()
    if fd < 0:
        raise OSError(errno.EBADF, "socket is closed")
    return os.read(fd, RECEIVE_SIZE)
