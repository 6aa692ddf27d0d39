"""The bench's sampler of PostgreSQL activity, against the test suite's real server."""

from __future__ import annotations

import threading
import time

import psycopg

from chatd.bench import dbwatch


def _sample(conninfo: str, seconds: float) -> dict:
    sampler = dbwatch.Sampler(conninfo, interval=0.01)
    sampler.start()
    time.sleep(seconds)
    return sampler.stop()


def test_a_statement_running_through_the_window_shows_as_busy_with_its_wait_event(db_conninfo):
    conninfo = db_conninfo
    started = threading.Event()

    def sleeper() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            started.set()
            conn.execute("SELECT pg_sleep(1.5)")

    thread = threading.Thread(target=sleeper)
    thread.start()
    started.wait(10)
    time.sleep(0.2)  # the statement is running
    figures = _sample(conninfo, 0.8)
    thread.join(10)
    assert figures["db_watch_error"] is None
    assert figures["db_samples"] >= 20
    assert figures["db_busy_pct"] >= 90, figures
    assert figures["db_waits"].get("Timeout:PgSleep", 0) >= 90, figures


def test_an_idle_database_is_not_busy_and_other_databases_do_not_count(db_conninfo, pg_server):
    started = threading.Event()

    def elsewhere() -> None:  # a statement in another database of the same server
        with psycopg.connect(pg_server.conninfo("postgres"), autocommit=True) as conn:
            started.set()
            conn.execute("SELECT pg_sleep(0.6)")

    thread = threading.Thread(target=elsewhere)
    thread.start()
    started.wait(10)
    figures = _sample(db_conninfo, 0.3)
    thread.join(10)
    assert figures["db_samples"] >= 5
    assert figures["db_busy_pct"] == 0 and figures["db_waits"] == {}, figures


def test_a_server_that_cannot_be_reached_gives_no_figures_and_says_why(tmp_path):
    conninfo = psycopg.conninfo.make_conninfo(host=str(tmp_path), port="1", user="nobody", dbname="postgres")
    figures = _sample(conninfo, 0.1)
    assert figures["db_busy_pct"] is None and figures["db_waits"] is None and figures["db_samples"] == 0
    assert figures["db_watch_error"], figures
