"""The WebSocket listener's accept loop: connections waiting in the backlog together,
and running out of file descriptors."""

from __future__ import annotations

import os
import resource
import socket
from urllib.parse import urlsplit

import trio
from structlog.testing import capture_logs

from chatd.transport import listener as listener_module
from tests.wire import connect

REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _address(server) -> tuple[str, int]:
    url = urlsplit(server.ws_url)
    return url.hostname, url.port


async def _switching_protocols(sock: socket.socket) -> bytes:
    """The response head the server wrote on ``sock`` (a blocking socket read off the loop)."""

    def read() -> bytes:
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return head

    return await trio.to_thread.run_sync(read)


async def test_a_burst_larger_than_one_accept_batch_is_served_whole(chatd_server):
    # Every connection completes in the kernel's backlog before the loop runs again,
    # so the listener finds them all at one wake-up and takes them in batches.
    count = listener_module.ACCEPT_BATCH * 2 + 7
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(_address(chatd_server), timeout=10)
            sock.sendall(REQUEST)
            sockets.append(sock)
        heads = [await _switching_protocols(sock) for sock in sockets]
        assert all(head.startswith(b"HTTP/1.1 101 ") for head in heads), [h[:40] for h in heads if not h.startswith(b"HTTP/1.1 101 ")]
    finally:
        for sock in sockets:
            sock.close()
    async with connect(chatd_server, "alice") as alice:
        assert (await alice.call("ping"))["type"] == "result"


async def test_out_of_descriptors_the_listener_logs_waits_and_accepts_once_it_can(chatd_server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    client = socket.create_connection(_address(chatd_server), timeout=10)
    try:
        client.sendall(REQUEST)
        with capture_logs() as logs:
            # A new descriptor must be numbered below the limit: none can be made now.
            resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))
            try:
                with trio.fail_after(10):
                    while not [e for e in logs if e["event"] == "ws.accept_failed"]:
                        await trio.sleep(0.01)
                await trio.sleep(listener_module.ACCEPT_RETRY * 2)  # it retries, and fails again
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        failures = [e for e in logs if e["event"] == "ws.accept_failed"]
        assert len(failures) >= 2 and failures[0]["error"] == os.strerror(24) and failures[0]["log_level"] == "error"
        head = await _switching_protocols(client)
        assert head.startswith(b"HTTP/1.1 101 "), head
    finally:
        client.close()
    async with connect(chatd_server, "bob") as bob:
        assert (await bob.call("ping"))["type"] == "result"
