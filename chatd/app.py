"""``chatd serve``: the root nursery.

Start order: database (embedded or URL, pool, migrations) -> service (writer,
registry) -> HTTP API -> WebSocket listener. On SIGINT/SIGTERM the reverse:
stop accepting, tell clients to reconnect elsewhere (goaway + close 4009), let
the writer flush, stop HTTP, stop the database; everything left is cancelled
when ``server.shutdown_grace`` runs out.
"""

from __future__ import annotations

import signal
from typing import Any

import structlog
import trio
from prometheus_client import CollectorRegistry

import chatd
from chatd import collector
from chatd.config import Config
from chatd.observe import ChatdCollector, GcPauses, metrics_text
from chatd.store.database import open_database
from chatd.transport import http
from chatd.transport.listener import serve_websocket

log = structlog.get_logger("chatd")


class Server:
    """What a running chatd holds; HTTP routes and the listener read it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.db = None
        self.service = None
        self.draining = False
        self.stop_requested = trio.Event()
        self.http_stopped = trio.Event()
        self.http_urls: list[str] = []
        self.ws_url = ""
        self.ws_port = 0
        self.http_port = 0
        self.gc_pauses = GcPauses()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ChatdCollector(self, self.gc_pauses))

    def metrics_text(self) -> bytes:
        return metrics_text(self.registry)

    async def readiness_problems(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("draining")
        try:
            with trio.fail_after(self.config.database.connect_timeout):
                await self.db.pool.execute("SELECT 1")
        except (chatd.errors.ChatdError, trio.TooSlowError) as exc:
            problems.append(f"database: {exc}")
        return problems

    def request_stop(self) -> None:
        self.stop_requested.set()


async def _watch_signals(server: Server) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("chatd.stopping", signal=signal.Signals(signum).name)
            server.request_stop()
            return


async def serve(config: Config, *, install_signal_handlers: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run chatd until a stop signal (or ``Server.request_stop``); drains on the way out.

    Raises chatd.errors.StartupError (and subclasses) when a part cannot start.
    """
    from chatd.service.runtime import open_service  # the service imports store, registry, auth

    server = Server(config)
    started = trio.current_time()
    async with open_database(config.database) as db:
        server.db = db
        async with open_service(config, db.pool) as service:
            server.service = service
            async with trio.open_nursery() as nursery:
                if install_signal_handlers:
                    nursery.start_soon(_watch_signals, server)
                app = http.create_app(server)
                server.http_urls = await nursery.start(
                    lambda task_status: http.serve_http(
                        app,
                        config.http.host,
                        config.http.port,
                        grace=config.server.shutdown_grace,
                        shutdown=server.http_stopped.wait,
                        task_status=task_status,
                    )
                )
                server.http_port = int(server.http_urls[0].rsplit(":", 1)[1])
                ws_scope = trio.CancelScope()
                listener = await nursery.start(serve_websocket, config.websocket, service, ws_scope)
                server.ws_port = listener.port
                server.ws_url = listener.url
                server.gc_pauses.install()
                nursery.start_soon(collector.manage, config.server.gc_freeze_interval, config.server.gc_full_interval)
                log.info(
                    "chatd.ready",
                    version=chatd.__version__,
                    http=server.http_urls[0],
                    websocket=server.ws_url,
                    database=db.description,
                    seconds=round(trio.current_time() - started, 3),
                )
                task_status.started(server)
                try:
                    await server.stop_requested.wait()
                    await _drain(server, listener, nursery)
                finally:
                    server.gc_pauses.uninstall()
    log.info("chatd.stopped", max_gc_pause_ms=round(server.gc_pauses.max_pause_ms, 3))


async def _drain(server: Server, listener: Any, nursery: trio.Nursery) -> None:
    server.draining = True
    grace = server.config.server.shutdown_grace
    with trio.move_on_after(grace) as scope:
        await listener.drain()
        await server.service.drain()
        server.http_stopped.set()
    if scope.cancelled_caught:
        log.warning("chatd.drain_timeout", grace=grace)
    server.http_stopped.set()
    nursery.cancel_scope.cancel()
