"""WebSocket transport on real sockets: interop, close handshakes, the fan-out write path."""

from __future__ import annotations

import select
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
)

from chatd.errors import Timeout
from chatd.protocol import websocket as ws
from chatd.transport.upgrade import accept_websocket
from chatd.transport.cork import corked
from chatd.transport.readiness import ReadHub
from chatd.transport.sockio import raw_send
from chatd.transport.websocket import ConnectionClosed, WebSocketConnection


@dataclass
class EchoServer:
    """A test server: echoes binary messages, closes on text, records how each ended."""

    port: int = 0
    max_pending_bytes: int = 1 << 20
    sndbuf: int | None = None
    echo: bool = True
    on_demand: bool = False  # writer started only while frames are pending (chatd's mode)
    hub: ReadHub | None = None  # reads woken by the read hub (chatd's mode), else by trio
    conns: list[WebSocketConnection] = field(default_factory=list)
    ended: list[tuple[int | None, str]] = field(default_factory=list)
    refused: list[Exception] = field(default_factory=list)
    resume_hint: Callable[[], str] = lambda: "slow consumer; resume after seq 41"

    async def handle(self, stream: trio.SocketStream) -> None:
        if self.sndbuf is not None:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        try:
            conn = await accept_websocket(
                stream,
                handshake_timeout=0.5,
                max_message_size=1 << 20,
                max_pending_bytes=self.max_pending_bytes,
                close_timeout=5,
                path_check=lambda path: path == "/ws",
                subprotocols=["chatd.v1"],
                slow_reason=self.resume_hint,
                hub=self.hub,
            )
        except (ws.HandshakeError, Timeout, ConnectionClosed) as exc:
            self.refused.append(exc)
            return
        self.conns.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                if self.on_demand:
                    conn.write_on_demand(nursery)
                else:
                    nursery.start_soon(self._write, conn, nursery.cancel_scope)
                await self._read(conn)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await conn.close()
            self.ended.append((conn.close_code, conn.close_reason))

    async def _write(self, conn: WebSocketConnection, scope: trio.CancelScope) -> None:
        await conn.run_writer()
        scope.cancel()

    async def _read(self, conn: WebSocketConnection) -> None:
        try:
            while True:
                op, payload = await conn.receive()
                if op == ws.OP_TEXT:
                    await conn.close(ws.CLOSE_UNSUPPORTED_DATA, "binary frames only")
                elif self.echo:
                    conn.deliver(ws.encode_binary(payload))
        except ConnectionClosed:
            pass


@pytest.fixture(params=["parked_writer", "writer_on_demand", "on_demand_with_read_hub"])
async def server(request, nursery: trio.Nursery) -> AsyncIterator[EchoServer]:
    srv = EchoServer(on_demand=request.param != "parked_writer")
    if request.param == "on_demand_with_read_hub":
        srv.hub = ReadHub()
        nursery.start_soon(srv.hub.run)
    listeners = await nursery.start(partial(trio.serve_tcp, srv.handle, 0, host="127.0.0.1"))
    srv.port = listeners[0].socket.getsockname()[1]
    yield srv


class WsprotoClient:
    """A minimal client on wsproto (an independent implementation) over a raw trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    @classmethod
    async def connect(
        cls, port: int, path: str = "/ws", rcvbuf: int | None = None
    ) -> WsprotoClient:
        sock = trio.socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        client = cls(trio.SocketStream(sock))
        await client.send(Request(host="127.0.0.1", target=path, subprotocols=["chatd.v1"]))
        return client

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def next_message(self) -> bytes:
        """The next whole binary message (wsproto hands large ones over in pieces)."""
        data = b""
        while True:
            event = await self.next_event()
            assert isinstance(event, BytesMessage), event
            data += event.data
            if event.message_finished:
                return data


async def test_trio_websocket_client_exchanges_binary_messages(server: EchoServer) -> None:
    with trio.fail_after(10):
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with trio_websocket.open_websocket_url(url, subprotocols=["chatd.v1"]) as client:
            assert client.subprotocol == "chatd.v1"
            for payload in (b"", b"hi", b"x" * 126, bytes(range(256)) * 1000):
                await client.send_message(payload)
                assert await client.get_message() == payload
            await client.ping(b"still there?")  # returns once the pong arrived
        assert server.conns[0].path == "/ws"


async def test_trio_websocket_client_close_code_reaches_the_server(server: EchoServer) -> None:
    with trio.fail_after(10):
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with trio_websocket.open_websocket_url(url) as client:
            await client.send_message(b"x")
            await client.get_message()
            await client.aclose(code=4000, reason="see you")
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended == [(4000, "see you")]


async def test_server_close_code_reaches_trio_websocket_client(server: EchoServer) -> None:
    with trio.fail_after(10):
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with trio_websocket.open_websocket_url(url) as client:
            await client.send_message("text is refused")
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await client.get_message()
            assert info.value.reason.code == ws.CLOSE_UNSUPPORTED_DATA
            assert info.value.reason.reason == "binary frames only"
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended == [(ws.CLOSE_UNSUPPORTED_DATA, "binary frames only")]


async def test_wsproto_client_messages_ping_and_close(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port)
        accepted = await client.next_event()
        assert isinstance(accepted, AcceptConnection) and accepted.subprotocol == "chatd.v1"
        await client.send(BytesMessage(b"a" * 70_000))
        assert await client.next_message() == b"a" * 70_000
        await client.send(BytesMessage(b"frag", message_finished=False))
        await client.send(Ping(b"between fragments"))
        await client.send(BytesMessage(b"mented", message_finished=True))
        assert await client.next_event() == Pong(b"between fragments")
        assert await client.next_message() == b"fragmented"
        await client.send(Ping(b"p1"))
        assert await client.next_event() == Pong(b"p1")
        await client.send(CloseConnection(code=1000, reason="done"))
        reply = await client.next_event()
        assert isinstance(reply, CloseConnection) and reply.code == 1000
        assert await client.stream.receive_some(10) == b""  # the server hung up
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended == [(1000, "done")]


async def test_protocol_violation_closes_with_1002(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port)
        assert isinstance(await client.next_event(), AcceptConnection)
        await client.stream.send_all(b"\x82\x02hi")  # unmasked client frame
        event = await client.next_event()
        assert isinstance(event, CloseConnection) and event.code == ws.CLOSE_PROTOCOL_ERROR
        assert await client.stream.receive_some(10) == b""  # the server half-closed
        await client.stream.aclose()
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended[0][0] == ws.CLOSE_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /ws HTTP/1.1\r\nX-Pad: " + b"a" * 20000, 431),
    ],
)
async def test_bad_handshakes_are_answered(
    server: EchoServer, request_bytes: bytes, status: int
) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(request_bytes)
        response = b""
        while chunk := await stream.receive_some(65536):
            response += chunk
        await stream.aclose()
        assert response.startswith(f"HTTP/1.1 {status} ".encode())
        while not server.refused:
            await trio.sleep(0.01)
        assert server.refused[0].status == status  # type: ignore[attr-defined]


async def test_unknown_path_is_404(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port, path="/nope")
        event = await client.next_event()
        assert isinstance(event, RejectConnection) and event.status_code == 404


async def test_silent_client_times_out_of_the_handshake(server: EchoServer) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\n")  # and then nothing
        assert await stream.receive_some(100) == b""  # closed after handshake_timeout
        while not server.refused:
            await trio.sleep(0.01)
        assert isinstance(server.refused[0], Timeout)


async def test_stalled_reader_is_closed_as_slow_consumer_while_others_keep_up(
    server: EchoServer,
) -> None:
    server.max_pending_bytes = 256 * 1024
    server.sndbuf = 16 * 1024
    server.echo = False
    with trio.fail_after(20):
        stalled = await WsprotoClient.connect(server.port, rcvbuf=16 * 1024)
        assert isinstance(await stalled.next_event(), AcceptConnection)
        url = f"ws://127.0.0.1:{server.port}/ws"
        async with trio_websocket.open_websocket_url(url) as healthy:
            while len(server.conns) < 2:
                await trio.sleep(0.01)
            slow_conn, fast_conn = server.conns
            sent = 0
            while not slow_conn.is_slow:
                assert sent < 2000, "the stalled reader never overflowed"
                frame = ws.encode_binary(sent.to_bytes(4, "big") + b"m" * 16_000)
                for conn in server.conns:
                    conn.deliver(frame)  # the same bytes to every recipient
                sent += 1
                assert int.from_bytes((await healthy.get_message())[:4], "big") == sent - 1
            assert sent > 256 * 1024 // 16_004  # it only overflowed after the bound
            assert fast_conn.is_open and fast_conn.pending_bytes == 0
            # The stalled client finally reads: what the kernel held, then 4008.
            while not isinstance(event := await stalled.next_event(), CloseConnection):
                assert isinstance(event, BytesMessage)
            assert event.code == ws.CLOSE_SLOW_CONSUMER
            assert event.reason == "slow consumer; resume after seq 41"
            await stalled.send(event.response())
            assert fast_conn.deliver(ws.encode_binary(b"still here"))
            assert await healthy.get_message() == b"still here"
        assert not slow_conn.deliver(ws.encode_binary(b"too late"))
        while len(server.ended) < 2:
            await trio.sleep(0.01)
        assert (ws.CLOSE_SLOW_CONSUMER, "slow consumer; resume after seq 41") in server.ended


async def _accepted_clients(server: EchoServer, n: int) -> list[WsprotoClient]:
    """``n`` wsproto clients whose handshakes the server accepted and registered."""
    clients = []
    for _ in range(n):
        client = await WsprotoClient.connect(server.port)
        assert isinstance(await client.next_event(), AcceptConnection)
        clients.append(client)
    while len(server.conns) < n:
        await trio.sleep(0.01)
    return clients


class SchedulingCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.scheduled = 0

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.scheduled += 1


async def test_fanout_to_200_connections_never_awaits_or_wakes_a_task(server: EchoServer) -> None:
    server.echo = False
    with trio.fail_after(20):
        clients = await _accepted_clients(server, 200)
        await trio.sleep(0.05)  # let every writer task park
        frame = ws.encode_binary(b"room event " * 50)
        counter = SchedulingCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            # deliver() is synchronous: this loop cannot yield to the scheduler, and
            # the instrument proves no writer task was even scheduled for later.
            delivered = [conn.deliver(frame) for conn in server.conns]
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert delivered == [True] * 200
        assert counter.scheduled == 0
        assert all(conn.pending_bytes == 0 for conn in server.conns)
        for client in clients:
            assert await client.next_event() == BytesMessage(b"room event " * 50)
        for client in clients:
            await client.stream.aclose()


async def test_corked_frames_are_held_then_sent_with_one_send_per_connection(server: EchoServer) -> None:
    server.echo = False
    with trio.fail_after(20):
        clients = await _accepted_clients(server, 2)
        first, second = server.conns
        sends = []
        for conn in server.conns:
            real = conn._send
            conn._send = lambda data, real=real, conn=conn: sends.append(conn) or real(data)
        with corked():
            assert first.deliver(ws.encode_binary(b"event"))
            assert second.deliver(ws.encode_binary(b"other room"))
            assert first.deliver(ws.encode_binary(b"ack"))
            assert sends == [] and first.pending_bytes == 0
            readable, _, _ = select.select([c.stream.socket.fileno() for c in clients], [], [], 0.05)
            assert readable == [], "a held frame reached the socket inside the block"
        assert sends == [first, second]  # one send each, in the order they were first held
        assert await clients[0].next_event() == BytesMessage(b"event")
        assert await clients[0].next_event() == BytesMessage(b"ack")
        assert await clients[1].next_event() == BytesMessage(b"other room")
        assert first.deliver(ws.encode_binary(b"after")) and sends[-1] is first  # direct again
        assert await clients[0].next_event() == BytesMessage(b"after")
        for client in clients:
            await client.stream.aclose()


async def test_receive_after_close_raises_and_close_is_idempotent(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port)
        assert isinstance(await client.next_event(), AcceptConnection)
        while not server.conns:
            await trio.sleep(0.01)
        conn = server.conns[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.close, 4001, "bye")
            event = await client.next_event()
            assert isinstance(event, CloseConnection) and event.code == 4001
            await client.send(event.response())
        await conn.close(1000)  # a second close changes nothing
        assert (conn.close_code, conn.close_reason) == (4001, "bye")
        with pytest.raises(ConnectionClosed) as info:
            await conn.receive()
        assert info.value.close_code == 4001
        assert not conn.deliver(ws.encode_binary(b"after close"))
        assert await client.stream.receive_some(10) == b""


async def test_oversize_message_closes_with_1009(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port)
        assert isinstance(await client.next_event(), AcceptConnection)
        await client.send(BytesMessage(b"x" * ((1 << 20) + 1)))
        event = await client.next_event()
        assert isinstance(event, CloseConnection | RejectData)
        assert isinstance(event, CloseConnection) and event.code == ws.CLOSE_MESSAGE_TOO_BIG


async def test_backlog_is_flushed_in_order_before_the_close_frame(server: EchoServer) -> None:
    server.echo = False
    server.sndbuf = 16 * 1024
    server.max_pending_bytes = 8 << 20
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port, rcvbuf=16 * 1024)
        assert isinstance(await client.next_event(), AcceptConnection)
        while not server.conns:
            await trio.sleep(0.01)
        conn = server.conns[0]
        frames = [ws.encode_binary(i.to_bytes(4, "big") + b"q" * 20_000) for i in range(100)]
        assert all(conn.deliver(frame) for frame in frames)
        assert conn.pending_bytes > 0  # the kernel refused some: the writer owns a backlog
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.close, 4002, "moving")
            received = [int.from_bytes((await client.next_message())[:4], "big") for _ in frames]
            assert received == list(range(100))
            event = await client.next_event()
            assert isinstance(event, CloseConnection) and event.code == 4002
            await client.send(event.response())
        assert conn.pending_bytes == 0


async def test_backlog_drains_and_direct_writes_resume(server: EchoServer) -> None:
    server.echo = False
    server.sndbuf = 16 * 1024
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port, rcvbuf=16 * 1024)
        assert isinstance(await client.next_event(), AcceptConnection)
        while not server.conns:
            await trio.sleep(0.01)
        conn = server.conns[0]
        payload = b"z" * 200_000
        assert conn.deliver(ws.encode_binary(payload))
        assert conn.pending_bytes > 0
        assert await client.next_message() == payload
        while conn.pending_bytes:
            await trio.sleep(0.01)
        counter = SchedulingCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            assert conn.deliver(ws.encode_binary(b"direct again"))
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.scheduled == 0 and conn.pending_bytes == 0
        assert await client.next_message() == b"direct again"


def test_fallback_send_refuses_a_closed_descriptor() -> None:
    a, b = socket.socketpair()
    with a, b:

        class SocketWithoutInternals:
            def fileno(self) -> int:
                return a.fileno()

        send = raw_send(SocketWithoutInternals())  # type: ignore[arg-type]
        assert send(b"hi") == 2
        assert b.recv(2) == b"hi"
        a.close()
        with pytest.raises(OSError):
            send(b"must not reach a reused descriptor")


async def test_peer_vanishing_without_close_is_1006(server: EchoServer) -> None:
    with trio.fail_after(10):
        client = await WsprotoClient.connect(server.port)
        assert isinstance(await client.next_event(), AcceptConnection)
        await client.stream.aclose()
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended[0][0] == ws.CLOSE_ABNORMAL
        assert not server.conns[0].deliver(ws.encode_binary(b"to nobody"))


class SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned.append(task.name)


async def test_peers_vanishing_together_start_no_task_on_the_way_out(server: EchoServer) -> None:
    # When thousands of clients drop at once, each close must not start a writer of
    # its own only to find the connection closed (a task, its context and a scheduler
    # pass per connection, all alive at once for the collector to walk).
    server.echo = False
    with trio.fail_after(20):
        clients = await _accepted_clients(server, 20)
        await trio.sleep(0.05)
        counter = SpawnCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            for client in clients:
                await client.stream.aclose()
            while len(server.ended) < 20:
                await trio.sleep(0.01)
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert [code for code, _ in server.ended] == [ws.CLOSE_ABNORMAL] * 20
        assert not [name for name in counter.spawned if "_write" in name], counter.spawned


async def test_a_message_larger_than_one_read_arrives_whole(server: EchoServer) -> None:
    # 300 KB is several 64 KB reads: with the read hub, a full read leaves the socket
    # marked readable and the next read takes the rest without waiting for an edge.
    with trio.fail_after(10):
        [client] = await _accepted_clients(server, 1)
        big = bytes(range(256)) * 1200
        for _ in range(3):
            await client.send(BytesMessage(data=big))
            got = b""
            while len(got) < len(big):
                event = await client.next_event()
                got += bytes(event.data)
            assert got == big


async def test_many_connections_read_through_one_wakeup_each_get_their_own_messages(server: EchoServer) -> None:
    with trio.fail_after(20):
        clients = await _accepted_clients(server, 50)
        for rounds in range(3):
            for i, client in enumerate(clients):  # all sent before any is read back
                await client.send(BytesMessage(data=b"%d:%d" % (i, rounds)))
            for i, client in enumerate(clients):
                event = await client.next_event()
                assert bytes(event.data) == b"%d:%d" % (i, rounds)
        if server.hub is not None:
            assert server.hub.watching == 50


async def test_closing_a_connection_wakes_its_parked_reader_and_frees_its_descriptor(server: EchoServer) -> None:
    with trio.fail_after(10):
        await _accepted_clients(server, 1)
        conn = server.conns[0]
        await conn.close(4000, "server side")  # its reader is parked in receive() meanwhile
        while not server.ended:
            await trio.sleep(0.01)
        assert server.ended == [(4000, "server side")]
        if server.hub is not None:
            assert server.hub.watching == 0
        # The next connection likely gets the same descriptor number; its reads reach it.
        second = await WsprotoClient.connect(server.port)
        assert isinstance(await second.next_event(), AcceptConnection)
        while len(server.conns) < 2:
            await trio.sleep(0.01)
        await second.send(BytesMessage(data=b"after reuse"))
        assert bytes((await second.next_event()).data) == b"after reuse"
        if server.hub is not None:
            assert server.hub.watching == 1
