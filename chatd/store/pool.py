"""A small trio connection pool over :class:`TrioConnection`.

Size-bounded, lazily filled, with an acquire deadline, a health check of
connections that sat idle, and reconnection: a connection that broke (server
restart, ``pg_terminate_backend``, a cancel that did not drain) is dropped on
release and a fresh one is opened on the next acquire.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import structlog
import trio
from psycopg import pq

from chatd import errors
from chatd.store.driver import TrioConnection, mapped_errors

log = structlog.get_logger("chatd.store")

_IDLE = pq.TransactionStatus.IDLE
_IN_TX = (pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR)
HEALTH_CHECK_AFTER = 30.0  # seconds idle before a connection is pinged on acquire


class Pool:
    """Use with :func:`open_pool`. Every method is cancel-safe."""

    def __init__(self, conninfo: str, *, size: int, acquire_timeout: float, connect_timeout: float, query_timeout: float) -> None:
        self.conninfo = conninfo
        self.size = size
        self.acquire_timeout = acquire_timeout
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._slots = trio.Semaphore(size)
        self._idle: deque[tuple[TrioConnection, float]] = deque()
        self._all: set[TrioConnection] = set()
        self._closed = False

    @property
    def in_use(self) -> int:
        return self.size - self._slots.value

    async def _connect(self) -> TrioConnection:
        conn = await TrioConnection.open(self.conninfo, connect_timeout=self.connect_timeout, autocommit=True)
        self._all.add(conn)
        return conn

    async def _take(self) -> TrioConnection:
        now = trio.current_time()
        while self._idle:
            conn, since = self._idle.pop()
            if conn.closed or conn.pgconn.status != pq.ConnStatus.OK:
                self._discard(conn)
                continue
            if now - since > HEALTH_CHECK_AFTER:
                try:
                    with trio.fail_after(self.connect_timeout), mapped_errors():
                        await conn.execute("SELECT 1")
                except (errors.Unavailable, errors.Internal):
                    self._discard(conn)
                    continue
            return conn
        return await self._connect()

    def _discard(self, conn: TrioConnection) -> None:
        self._all.discard(conn)
        if not conn.closed:
            conn.pgconn.finish()

    async def _give_back(self, conn: TrioConnection) -> None:
        status = conn.pgconn.transaction_status
        if status in _IN_TX and not conn.closed:
            # Roll back what the borrower left open, even if we are being cancelled.
            with trio.move_on_after(self.connect_timeout) as scope:
                scope.shield = True
                try:
                    await conn.rollback()
                except Exception:  # noqa: BLE001 - any failure means: drop it
                    self._discard(conn)
                    return
            status = conn.pgconn.transaction_status
        if self._closed or conn.closed or status != _IDLE:
            self._discard(conn)
        else:
            self._idle.append((conn, trio.current_time()))

    @asynccontextmanager
    async def connection(self, timeout: float | None = None) -> AsyncIterator[TrioConnection]:
        """Borrow a connection for at most ``timeout`` (default: query_timeout) seconds.

        Raises errors.Unavailable when no connection frees up within
        acquire_timeout or the database is unreachable, errors.Timeout when the
        work overruns, and chatd errors mapped from psycopg for query failures.
        """
        if self._closed:
            raise errors.Unavailable("database pool is closed")
        budget = self.query_timeout if timeout is None else timeout
        try:
            with trio.fail_after(self.acquire_timeout):
                await self._slots.acquire()
        except trio.TooSlowError:
            raise errors.Unavailable(
                f"no database connection free within {self.acquire_timeout}s", retry_after=self.acquire_timeout
            ) from None
        try:
            conn = await self._take()
            try:
                with trio.fail_after(budget), mapped_errors():
                    yield conn
            except trio.TooSlowError:
                raise errors.Timeout(f"database work exceeded {budget}s") from None
            finally:
                await self._give_back(conn)
        finally:
            self._slots.release()

    @asynccontextmanager
    async def transaction(self, timeout: float | None = None) -> AsyncIterator[TrioConnection]:
        """A connection inside one transaction: committed on exit, rolled back on error."""
        async with self.connection(timeout) as conn:
            async with conn.transaction():
                yield conn

    async def fetch(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall() if cur.description else []

    async def fetchone(self, query: Any, params: Any = None) -> dict[str, Any] | None:
        async with self.connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone() if cur.description else None

    async def execute(self, query: Any, params: Any = None) -> None:
        async with self.connection() as conn:
            await conn.execute(query, params)

    async def dedicated(self) -> TrioConnection:
        """A connection outside the pool (LISTEN, long-lived work); caller closes it."""
        with mapped_errors():
            return await TrioConnection.open(self.conninfo, connect_timeout=self.connect_timeout, autocommit=True)

    async def aclose(self) -> None:
        self._closed = True
        for conn in list(self._all):
            self._discard(conn)
        self._idle.clear()


@asynccontextmanager
async def open_pool(conninfo: str, *, size: int, acquire_timeout: float, connect_timeout: float, query_timeout: float) -> AsyncIterator[Pool]:
    """A pool whose first connection is opened (and checked) before it is yielded.

    Raises errors.Unavailable/Timeout when the database cannot be reached.
    """
    pool = Pool(conninfo, size=size, acquire_timeout=acquire_timeout, connect_timeout=connect_timeout, query_timeout=query_timeout)
    try:
        await pool.execute("SELECT 1")
        yield pool
    finally:
        await pool.aclose()
