"""psycopg 3 driven natively from trio.

psycopg keeps all PostgreSQL protocol work in generators that yield "wait for
this fd to be readable/writable" and resume with what became ready. Its
AsyncConnection drives them with asyncio; :class:`TrioConnection` drives the same
generators with ``trio.lowlevel.wait_readable``/``wait_writable`` and guards the
connection with a ``trio.Lock``. Everything else (cursors, adaptation,
transactions, COPY) is psycopg's own code, so behaviour matches psycopg exactly.
The one exception is :meth:`TrioConnection.run_statement`, for the statement that
runs once per batch of sends: a statement prepared on each connection (and again every
REPREPARE_INTERVAL seconds, for fresh plans), run with libpq's calls through the same
waits, its result handed back undecoded.

Cancellation: when a trio cancel arrives while a query runs on the server, the
query is cancelled server-side (libpq's non-blocking cancel), the result drained
within ``CANCEL_GRACE`` seconds, and the connection stays usable; if the server
does not answer in time the connection is closed so no caller ever reuses a
connection in an unknown state. ``trio.Cancelled`` always propagates.

The generator API is not public psycopg API: pyproject.toml pins the minor
version and tests/store/test_driver.py exercises every path used here.
"""

from __future__ import annotations

import itertools
import select
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import psycopg
import trio
from psycopg import errors as pgerr
from psycopg import pq
from psycopg.pq.abc import PGconn, PGresult
from psycopg.conninfo import make_conninfo
from psycopg._enums import Ready, Wait
from psycopg.generators import execute, notifies
from psycopg.rows import dict_row

from chatd import errors

RV = TypeVar("RV")

WAIT_R = Wait.R
WAIT_W = Wait.W
READY_R = Ready.R
READY_W = Ready.W
CANCEL_GRACE = 5.0
REPREPARE_INTERVAL = 10.0  # seconds a statement of run_statement keeps its plans
_ACTIVE = pq.TransactionStatus.ACTIVE
_COMMAND_OK = pq.ExecStatus.COMMAND_OK
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
JSONB_OID = 3802  # pg_type oid, for Statement parameter types

_poller = select.poll


def _ready_now(fileno: int, wait: int) -> int:
    """Zero-timeout readiness probe: cheaper than a trip through the scheduler."""
    poller = _poller()
    poller.register(fileno, (select.POLLIN if wait & WAIT_R else 0) | (select.POLLOUT if wait & WAIT_W else 0))
    ready = 0
    for _, event in poller.poll(0):
        if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
            ready |= READY_R
        if event & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            ready |= READY_W
    return ready & wait


async def _wait_fd(fileno: int, wait: int) -> int:
    """Wait until ``fileno`` is ready for what ``wait`` asks; return what is ready."""
    if wait == WAIT_R:
        await trio.lowlevel.wait_readable(fileno)
        return READY_R
    if wait == WAIT_W:
        await trio.lowlevel.wait_writable(fileno)
        return READY_W
    ready = _ready_now(fileno, wait)
    if ready:
        await trio.lowlevel.checkpoint()
        return ready
    # Both directions: whichever comes first (rare: large sends with output pending).
    async with trio.open_nursery() as nursery:

        async def watch(waiter) -> None:
            await waiter(fileno)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch, trio.lowlevel.wait_readable)
        nursery.start_soon(watch, trio.lowlevel.wait_writable)
    return _ready_now(fileno, wait) or READY_R


async def drive(gen, fileno: int) -> Any:
    """Run a psycopg PQGen to completion on ``fileno``. Not cancel-safe by itself."""
    try:
        wait = next(gen)
        while True:
            ready = _ready_now(fileno, wait) if wait & WAIT_W else 0
            if not ready:
                ready = await _wait_fd(fileno, wait)
            wait = gen.send(ready)
    except StopIteration as stop:
        return stop.value
    except OSError as exc:
        raise pgerr.OperationalError("connection socket closed") from exc


async def drive_conn(gen) -> Any:
    """Run a psycopg PQGenConn (connect/cancel: the fd may change) to completion."""
    try:
        fileno, wait = next(gen)
        while True:
            ready = await _wait_fd(fileno, wait)
            fileno, wait = gen.send(ready)
    except StopIteration as stop:
        return stop.value


class TrioConnection(psycopg.AsyncConnection):
    """An AsyncConnection whose waits and lock are trio's. Open with :meth:`open`."""

    @classmethod
    async def open(cls, conninfo: str, *, connect_timeout: float, autocommit: bool = False, **kwargs: Any) -> "TrioConnection":
        """Connect within ``connect_timeout`` seconds.

        Raises errors.Unavailable when the server cannot be reached or refuses,
        errors.Timeout when the deadline passes. Cancel-safe (nothing leaks).
        """
        dsn = make_conninfo(conninfo, **kwargs)
        gen = cls._connect_gen(dsn)
        try:
            with trio.fail_after(connect_timeout):
                conn = await drive_conn(gen)
        except trio.TooSlowError:
            gen.close()
            raise errors.Timeout(f"database connect timed out after {connect_timeout}s") from None
        except psycopg.Error as exc:
            raise errors.Unavailable(f"database unreachable: {first_line(exc)}") from exc
        conn.lock = trio.Lock()
        conn._autocommit = autocommit
        conn.row_factory = dict_row
        conn.statements = {}  # Statement.name -> (name prepared under, trio time prepared)
        conn._statement_numbers = itertools.count(1)
        return conn

    async def run_statement(
        self, statement: Statement, params: list[bytes | None], on_sent: Callable[[], None] | None = None
    ) -> PGresult:
        """Execute ``statement`` (prepared on this connection at its first use) with text
        parameters and return its result, without psycopg's cursors.

        For the hottest statement (a batch of sends): psycopg's cursor path (query
        conversion, adaptation, row objects) costs about as much client CPU as the
        round trip itself.
        The statement runs as its own command: in autocommit mode it commits by itself,
        inside a transaction it joins it. Raises psycopg errors, like ``execute``.
        ``on_sent`` is called once the statement has been handed to the socket, before
        the wait for its answer.
        """
        async with self.lock:
            pgconn = self.pgconn
            name = await self._prepare_statement(statement)
            pgconn.send_query_prepared(name, params)
            if on_sent is not None:
                pgconn.flush()  # what the socket does not take now, the answer's wait sends
                on_sent()
            return _check(await self.wait(execute(pgconn)), pgconn, _TUPLES_OK)

    async def _prepare_statement(self, statement: Statement) -> bytes:
        """The name ``statement`` is prepared under on this connection; prepared again, under a
        new name, once it is REPREPARE_INTERVAL seconds old. Called with the lock held.

        PostgreSQL keeps a prepared statement's generic plan until the statistics of a table
        it reads change. A plan made while a table was nearly empty (a fresh database) scans
        it, and goes on scanning as the table grows until autovacuum analyzes it again; a new
        plan sizes the table from its pages as they are now.
        """
        pgconn = self.pgconn
        now = trio.current_time()
        current = self.statements.get(statement.name)
        if current is not None and now - current[1] < REPREPARE_INTERVAL:
            return current[0]
        name = b"%s_%d" % (statement.name, next(self._statement_numbers))
        pgconn.send_prepare(name, statement.sql, param_types=statement.types)
        _check(await self.wait(execute(pgconn)), pgconn, _COMMAND_OK)
        self.statements[statement.name] = (name, now)
        if current is not None:
            pgconn.send_query(b"DEALLOCATE " + current[0])
            _check(await self.wait(execute(pgconn)), pgconn, _COMMAND_OK)
        return name

    async def wait(self, gen, interval: float = 0.0, timeout: float | None = None):  # noqa: ARG002
        fileno = self.pgconn.socket
        try:
            return await drive(gen, fileno)
        except trio.Cancelled:
            if self.pgconn.transaction_status == _ACTIVE:
                await self._cancel_and_drain(gen, fileno)
            raise

    async def receive_notifies(self) -> list[psycopg.Notify]:
        """Wait for LISTEN notifications; returns at least one. Cancel-safe.

        Use on a dedicated connection (one that runs nothing else meanwhile).
        """
        async with self.lock:
            backlog = self._notifies_backlog
            if backlog:
                out = list(backlog)
                backlog.clear()
                return out
            enc = self.pgconn._encoding
            try:
                pgns = await self.wait(notifies(self.pgconn))
            except psycopg.Error as exc:
                raise errors.Unavailable(f"notification connection lost: {first_line(exc)}") from exc
            return [psycopg.Notify(n.relname.decode(enc), n.extra.decode(enc), n.be_pid) for n in pgns]

    async def _cancel_and_drain(self, gen, fileno: int) -> None:
        """Cancel the running query on the server and consume its result, shielded.

        Leaves the connection idle (or in a failed transaction, which the pool
        rolls back); closes it if the server does not respond in time.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + CANCEL_GRACE
            try:
                await drive_conn(self._cancel_gen())
                await drive(gen, fileno)
            except pgerr.QueryCanceled:
                pass
            except psycopg.Error:
                pass  # the query failed some other way while cancelling: state is known
            except OSError:
                self.pgconn.finish()
        if scope.cancelled_caught or self.pgconn.transaction_status == _ACTIVE:
            self.pgconn.finish()


class Statement:
    """A server-side prepared statement for :meth:`TrioConnection.run_statement`:
    ``sql`` with ``$1``-style placeholders, and the type OIDs of its parameters."""

    __slots__ = ("name", "sql", "types")

    def __init__(self, name: str, sql: str, types: list[int]) -> None:
        self.name = name.encode()
        self.sql = sql.encode()
        self.types = types


def _check(results: list[PGresult], pgconn: PGconn, status: int) -> PGresult:
    """The last of one command's results; the psycopg error it carries if it failed."""
    for result in results:
        if result.status != status:
            raise pgerr.error_from_result(result, encoding=pgconn._encoding)
    return results[-1]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (psycopg's carry detail lines), or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Map psycopg exceptions to chatd's error tree (httpcore's map_exceptions idea)."""
    try:
        yield
    except pgerr.UniqueViolation as exc:
        raise errors.Conflict(first_line(exc), constraint=exc.diag.constraint_name) from exc
    except pgerr.QueryCanceled as exc:
        raise errors.Timeout(f"database query cancelled: {first_line(exc)}") from exc
    except (pgerr.OperationalError, pgerr.InterfaceError) as exc:
        raise errors.Unavailable(f"database unavailable: {first_line(exc)}") from exc
    except (pgerr.SerializationFailure, pgerr.DeadlockDetected) as exc:
        raise errors.Contention(f"database contention: {first_line(exc)}") from exc
    except psycopg.Error as exc:
        raise errors.Internal(f"database error: {first_line(exc)}") from exc
