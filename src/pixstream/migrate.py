"""Apply the schema migrations: each file once, in order, in its own transaction.

Every gunicorn worker and every host runs this at start-up, so the runner takes
a PostgreSQL advisory lock: the first caller applies what is missing and the
others wait, then find nothing left to do.
"""

from __future__ import annotations

import logging

import psycopg

from pixstream import db
from pixstream.sql import migrations

log = logging.getLogger(__name__)

_LOCK_KEY = 7242  # arbitrary, constant: pixstream's migration lock

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS pixstream_migration (
    name        text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def upgrade(conninfo: str) -> list[str]:
    """Apply pending migrations; return the names applied by this call."""
    applied_now: list[str] = []
    with psycopg.connect(
        conninfo,
        autocommit=True,
        connect_timeout=10,
        fallback_application_name=db.application_name("pixstream-migrate"),
    ) as conn:
        # Session-level lock: held across the per-file transactions below.
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
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


def upgrade_at_start(conninfo: str) -> None:
    """Upgrade, but let a worker boot while the database is down.

    A worker that gunicorn restarts during a database outage must come up and
    answer 503 until the database is back, not fail to boot (which would stop
    the whole server). The schema is then the one the release phase applied.
    """
    try:
        upgrade(conninfo)
    except psycopg.OperationalError as exc:
        log.warning("database unreachable at start-up, migrations not checked: %s", exc)
