"""Server-side time limits: PostgreSQL gives up on a pooled connection's work before the client.

The client's deadline (gevent, ``db.transaction``) abandons a connection but not
its backend, which would go on running the statement and holding its locks.
Every pooled connection therefore carries ``statement_timeout``, ``lock_timeout``
and ``idle_in_transaction_session_timeout``, derived from the pool timeout
(``db.server_limits``). The tests run without gevent in this process, so the
client-side deadline never fires here: whatever ends the work is the server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from flask import Flask

from _streamkit import MULTIPART, close_all, e2e_ids, new_ispb, wait_for
from pixstream import db as pixdb
from pixstream import store
from pixstream.errors import DatabaseUnavailable
from pixstream.runtime import runtime
from problems import assert_problem
from test_overlapping_retries import fresh_id

LIMITS = ("lock_timeout", "statement_timeout", "idle_in_transaction_session_timeout")


def session_limits(conn: psycopg.Connection) -> dict[str, float]:
    """This session's limits, in seconds (0: none)."""
    rows = conn.execute(
        "SELECT name, setting::float / 1000 FROM pg_settings WHERE name = ANY(%s)", (list(LIMITS),)
    ).fetchall()
    return dict(rows)  # type: ignore[arg-type]


def test_the_limits_fire_before_the_client_gives_up() -> None:
    for pool_timeout in (0.1, 1, 3, 9):
        limits = pixdb.server_limits(pool_timeout, lock_timeout=0.05)
        # A statement is cancelled before the request's deadline abandons it...
        assert 0 < limits.statement < pool_timeout
        assert limits.lock == 0.05
        # ...a lock wait too, even one configured longer than that...
        assert pixdb.server_limits(pool_timeout, lock_timeout=60).lock == limits.statement
        # ...and a transaction idle longer than any request may last is ended.
        assert limits.idle_in_transaction > pool_timeout


def test_every_pooled_connection_carries_the_limits(make_app: Callable[..., Flask]) -> None:
    app = make_app(POOL_TIMEOUT_SECONDS=2, STREAM_LOCK_TIMEOUT_SECONDS=0.5)
    expected = pixdb.server_limits(2, lock_timeout=0.5)
    with app.app_context():
        pool = runtime().pool
        # Two connections at once: each new connection is configured, not only the first.
        with pixdb.transaction(pool) as one, pixdb.transaction(pool) as two:
            assert one.info.backend_pid != two.info.backend_pid
            for conn in (one, two):
                assert session_limits(conn) == {
                    "lock_timeout": 0.5,
                    "statement_timeout": expected.statement,
                    "idle_in_transaction_session_timeout": expected.idle_in_transaction,
                }
                # SHOW says so too, in the units an operator reads.
                shown = conn.execute("SHOW statement_timeout").fetchone()
                assert shown == ("1500ms",)


def test_a_slow_statement_is_cancelled_by_the_server_and_answers_503(
    make_app: Callable[..., Flask], db: psycopg.Connection
) -> None:
    app = make_app(POOL_TIMEOUT_SECONDS=1)
    limit = pixdb.server_limits(1).statement
    with app.app_context():
        pool = runtime().pool
        started = time.perf_counter()
        with pytest.raises(DatabaseUnavailable) as raised, pixdb.transaction(pool) as conn:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.perf_counter() - started
        assert isinstance(raised.value.__cause__, psycopg.errors.QueryCanceled), raised.value
        assert "statement_timeout" in str(raised.value)
        assert limit - 0.05 <= elapsed <= limit + 1, elapsed
        # The statement is gone from the server, not merely abandoned by the client.
        running = db.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        ).fetchone()
        assert running == (0,)
        # The pool keeps serving: the connection was rolled back, not broken.
        with pixdb.transaction(pool) as conn:
            store.ping(conn)


def test_seeding_is_not_cut_short_by_the_protocols_statement_timeout(
    make_app: Callable[..., Flask],
) -> None:
    app = make_app(POOL_TIMEOUT_SECONDS=1)
    with app.app_context(), pixdb.transaction(runtime().pool) as conn:
        store.set_local_statement_timeout(conn, 600)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("10min",)
        conn.execute("SELECT pg_sleep(1)")  # longer than the pooled limit (0.75 s)


@pytest.mark.server
@pytest.mark.faults
def test_a_frozen_lock_holder_is_ended_by_the_server_and_the_stream_reads_again(
    start_server, db: psycopg.Connection, database_url: str
) -> None:
    """Another host's worker freezes mid-transaction holding a stream's row lock.

    Reads of that stream answer 503 in time (lock_timeout) meanwhile; the
    server ends the frozen transaction within idle_in_transaction_session_timeout,
    which releases the lock, and the next read delivers the message. The frozen
    worker, when it wakes, finds its connection gone: 503, never a 500.
    """
    settings = {"POOL_TIMEOUT_SECONDS": 1, "STREAM_LOCK_TIMEOUT_SECONDS": 0.5}
    server = start_server(workers=1, **settings)
    limits = pixdb.server_limits(1, lock_timeout=0.5)
    ispb = new_ispb()
    pull = fresh_id(server.http, db, ispb, queued=1)  # the path of the stream's next read

    # The other host: the same pool a pixstream worker builds, frozen after the lock.
    other_host = pixdb.make_pool(database_url, max_size=1, timeout=1, lock_timeout=0.5)
    other_host.open(wait=True)
    locked, thaw = threading.Event(), threading.Event()
    holder: dict[str, object] = {}

    def frozen_request() -> None:
        try:
            with pixdb.transaction(other_host) as conn:
                holder["pid"] = conn.info.backend_pid
                pull_id = pull.rsplit("/", 1)[-1]
                assert store.lock_stream(conn, pull_id, idle_seconds=60) is not None
                locked.set()
                thaw.wait(30)  # a worker stopped mid-transaction; its socket stays open
        except Exception as exc:
            holder["error"] = exc

    thread = threading.Thread(target=frozen_request, daemon=True)
    thread.start()
    try:
        assert locked.wait(10), holder
        frozen_at = time.monotonic()

        started = time.perf_counter()
        reply = server.http.get(pull, MULTIPART)
        elapsed = time.perf_counter() - started
        assert_problem(reply, 503, retry_after=True)
        assert 0.4 <= elapsed <= 0.5 + 1, elapsed

        def backend_gone() -> bool:
            row = db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (holder["pid"],)
            ).fetchone()
            return row == (0,)

        wait_for(backend_gone, timeout=limits.idle_in_transaction + 2, what="the server ends it")
        assert time.monotonic() - frozen_at >= limits.idle_in_transaction - 0.1
        # No backend of the database is left idle in a transaction past the limit.
        (lingering,) = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'idle in transaction'"
            " AND state_change < now() - make_interval(secs => %s)",
            (limits.idle_in_transaction,),
        ).fetchone()  # type: ignore[misc]
        assert lingering == 0

        reply = server.http.get(pull, MULTIPART)
        assert reply.status == 200 and len(e2e_ids(reply)) == 1, (reply.status, reply.body[:200])
        assert server.http.delete(reply.pull_next).status == 200
    finally:
        thaw.set()
        thread.join(10)
        other_host.close()
        close_all([server.http])
    # The worker that wakes up finds its transaction ended: a 503, not a 500.
    assert isinstance(holder.get("error"), DatabaseUnavailable), holder.get("error")
