"""How busy chatd's PostgreSQL was during a step, from ``pg_stat_activity`` samples.

CPU figures say how much PostgreSQL worked, not whether chatd was waiting on it: a
backend that waits for a WAL segment to be zero-filled or a flush to finish uses no CPU.
A thread of the bench asks ``pg_stat_activity`` every :data:`INTERVAL` seconds which
client backends of the database it is connected to (chatd's) are executing a statement and what each waits on, if anything. A step's
row then says in what share of the samples a statement was executing (``db_busy_pct``)
and, per wait event, in what share of them a backend was in it (``db_waits``: ``CPU``
for none, else ``type:event``, e.g. ``IO:WalSync``). Each sample is a query of its own:
about 0.5 % of a core of PostgreSQL's time at 20 per second, counted in ``db_cpu_pct``.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from chatd.store.driver import first_line
from chatd.store.embedded import SUPERUSER

INTERVAL = 0.05
TIMEOUT = 5.0  # connect timeout and statement timeout of the sampling connection, seconds

_QUERY = (
    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity"
    " WHERE state = 'active' AND backend_type = 'client backend' AND datname = current_database()"
    " AND pid <> pg_backend_pid()"
)


def no_figures(error: str | None = None) -> dict:
    """A step's figures when nothing was sampled (a peer, which has no database, or an error)."""
    return {"db_busy_pct": None, "db_waits": None, "db_samples": 0, "db_watch_error": error}


def embedded_conninfo(state_dir: Path, dbname: str) -> str:
    """Database ``dbname`` of the embedded server chatd runs under ``state_dir``."""
    root = Path(state_dir) / "postgres"
    port = int((root / "port").read_text())
    return make_conninfo(host=str(root / "run"), port=str(port), user=SUPERUSER, dbname=dbname)


class Sampler:
    """Samples from :meth:`start` to :meth:`stop`; one per step."""

    def __init__(self, conninfo: str, interval: float = INTERVAL) -> None:
        self.conninfo = conninfo
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples = 0
        self._busy = 0
        self._waits: collections.Counter[str] = collections.Counter()
        self._error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-dbwatch", daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        """End the sampling; the step's figures (None when nothing could be sampled)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(TIMEOUT + 1)
        if not self._samples:
            return no_figures(self._error)
        n = self._samples
        return {
            "db_busy_pct": round(self._busy * 100 / n, 1),
            "db_waits": {event: round(count * 100 / n, 1) for event, count in self._waits.most_common()},
            "db_samples": n,
            "db_watch_error": self._error,
        }

    def _run(self) -> None:
        try:
            with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=TIMEOUT,
                                 options=f"-c statement_timeout={int(TIMEOUT * 1000)}") as conn:
                next_at = time.monotonic()
                while not self._stop.is_set():
                    events = [row[0] for row in conn.execute(_QUERY).fetchall()]
                    self._samples += 1
                    if events:
                        self._busy += 1
                        self._waits.update(events)
                    # A slow sample moves the schedule on rather than bursting to catch up.
                    next_at = max(next_at + self.interval, time.monotonic())
                    self._stop.wait(next_at - time.monotonic())
        except psycopg.Error as exc:  # the figures say so; the step itself goes on
            self._error = first_line(exc)
