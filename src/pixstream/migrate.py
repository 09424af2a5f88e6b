"""Apply the schema migrations: each file once, in order, in its own transaction.

Every gunicorn worker and every host runs this at start-up, so the runner takes
a PostgreSQL advisory lock: the first caller applies what is missing and the
others wait, then find nothing left to do. At start-up the wait is bounded
(BOOT_LOCK_WAIT): a worker blocked behind a long release migration would be
killed by gunicorn's timeout and restarted, in a loop, so it starts without the
lock instead and reports the pending schema through /readyz.
"""

from __future__ import annotations

import logging

import psycopg

from pixstream import db
from pixstream.sql import migrations

log = logging.getLogger(__name__)

_LOCK_KEY = 7242  # arbitrary, constant: pixstream's migration lock

# Longest a booting worker waits for the migration lock: well under gunicorn's
# worker timeout (long poll + 30 s), which also runs while a worker boots.
BOOT_LOCK_WAIT = 5.0  # seconds

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS pixstream_migration (
    name        text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class LockBusy(Exception):
    """Another session held the migration lock for longer than the allowed wait."""


def _connect(conninfo: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=10,
        fallback_application_name=db.application_name("pixstream-migrate"),
    )


def _take_lock(conn: psycopg.Connection[tuple[object, ...]], wait: float | None) -> None:
    """Take the session-level migration lock, waiting at most ``wait`` seconds (None: forever).

    Advisory locks honour lock_timeout; it is reset at once so that it does not
    apply to the migrations themselves.
    """
    if wait is None:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        return
    if wait <= 0:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()
        if not (row and row[0]):
            raise LockBusy("the migration lock is held by another session")
        return
    conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(wait * 1000))}ms",))
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
    except psycopg.errors.LockNotAvailable as exc:
        raise LockBusy(
            f"the migration lock is held by another session for over {wait:g} s"
        ) from exc
    finally:
        conn.execute("RESET lock_timeout")


def _pending(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    row = conn.execute("SELECT to_regclass('pixstream_migration') IS NOT NULL").fetchone()
    done: set[object] = set()
    if row and row[0]:
        done = {name for (name,) in conn.execute("SELECT name FROM pixstream_migration")}
    return [migration.name for migration in migrations() if migration.name not in done]


def pending(conninfo: str) -> list[str]:
    """The migrations the database's ledger lacks, in order; empty when the schema is current.

    Takes no lock: it is how a worker that could not take it knows whether it may serve.
    """
    with _connect(conninfo) as conn:
        return _pending(conn)


def upgrade(conninfo: str, *, lock_wait: float | None = None) -> list[str]:
    """Apply pending migrations; return the names applied by this call.

    ``lock_wait`` bounds the wait for another runner's lock (None: no bound, the
    release phase); past it, LockBusy and nothing is applied.
    """
    applied_now: list[str] = []
    with _connect(conninfo) as conn:
        # Session-level lock: held across the per-file transactions below.
        _take_lock(conn, lock_wait)
        try:
            conn.execute(_CREATE_LEDGER)
            done = {row[0] for row in conn.execute("SELECT name FROM pixstream_migration")}
            for migration in migrations():
                if migration.name in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql)  # type: ignore[arg-type]
                    conn.execute(
                        "INSERT INTO pixstream_migration (name) VALUES (%s)", (migration.name,)
                    )
                log.info("applied migration %s", migration.name)
                applied_now.append(migration.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def upgrade_at_start(conninfo: str, *, lock_wait: float = BOOT_LOCK_WAIT) -> list[str]:
    """Upgrade with a bounded lock wait; let a worker boot while the database is down.

    A worker that gunicorn restarts during a database outage must come up and
    answer 503 until the database is back, not fail to boot (which would stop
    the whole server). The schema is then the one the release phase applied.
    A worker that cannot take the lock in time (a long release migration)
    boots too. Returns the migrations still pending: the caller must not report
    ready until they are applied (empty when the schema is current or unknown).
    """
    try:
        upgrade(conninfo, lock_wait=lock_wait)
    except LockBusy as exc:
        try:
            waiting = pending(conninfo)
        except psycopg.OperationalError as error:
            log.warning("migrations not checked: %s; %s", exc, error)
            return []
        if waiting:
            log.warning("%s; starting, not ready until %s applied", exc, ", ".join(waiting))
        else:
            log.info("%s; the schema is current, starting", exc)
        return waiting
    except psycopg.OperationalError as exc:
        log.warning("database unreachable at start-up, migrations not checked: %s", exc)
    return []
