"""The HTTP API: a Quart-Trio app served by hypercorn's trio worker.

Routes are thin: they parse the request, call the service, and map chatd errors
to JSON bodies ``{"error": {"code", "message", "details"}}`` with the error's
HTTP status.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable

import hypercorn.config
import hypercorn.trio
import structlog
import trio
from quart import g, jsonify, request
from quart_trio import QuartTrio

import chatd
from chatd import errors

log = structlog.get_logger("chatd.http")
QUIET_PATHS = frozenset({"/healthz", "/metrics"})  # probed every few seconds: not worth a line each


def create_app(state: Any) -> QuartTrio:
    """The Quart-Trio app. ``state`` is the running server (app.Server)."""
    app = QuartTrio("chatd")
    app.config["JSON_SORT_KEYS"] = False
    request_ids = itertools.count(1)

    @app.before_request
    async def bind_request():
        g.request_id = next(request_ids)
        g.started = time.perf_counter()

    @app.after_request
    async def log_request(response):
        if request.path not in QUIET_PATHS:
            log.info(
                "http.request",
                request_id=g.request_id,
                method=request.method,
                path=request.path,
                status=response.status_code,
                ms=round((time.perf_counter() - g.started) * 1000, 2),
            )
        return response

    @app.errorhandler(errors.ChatdError)
    async def chatd_error(err: errors.ChatdError):
        if err.status >= 500:
            log.warning("http.error", code=err.code, message=err.message)
        return jsonify({"error": err.to_wire()}), err.status

    @app.get("/healthz")
    async def healthz():
        return jsonify({"status": "alive", "server": f"chatd/{chatd.__version__}"})

    @app.get("/metrics")
    async def metrics():
        return state.metrics_text(), 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}

    @app.get("/readyz")
    async def readyz():
        problems = await state.readiness_problems()
        if problems:
            return jsonify({"status": "not_ready", "problems": problems}), 503
        return jsonify({"status": "ready"})

    return app


async def serve_http(app: QuartTrio, host: str, port: int, *, grace: float, shutdown: Callable, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until ``shutdown()`` returns; reports the bound URLs to task_status."""
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = grace
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = 30
    await hypercorn.trio.serve(app, config, shutdown_trigger=shutdown, task_status=task_status)
