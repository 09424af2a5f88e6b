"""Booting while another session holds the migration lock (a long release migration).

Workers must not wait on the lock without a bound: gunicorn's timeout would
kill them and they would restart, in a loop. They boot, stay live (/healthz),
say why they are not ready (/readyz) while the schema lacks a migration, and
become ready once it is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

from _streamkit import wait_for
from conftest import Server
from httpclient import Reply
from pixstream.sql import migrations

ALL = [m.name for m in migrations()]
LOCK_KEY = 7242  # pixstream's migration lock (migrate._LOCK_KEY)


class BootingServer(Server):
    """A Server that does not wait for readiness: the test watches it boot."""

    def _wait_ready(self, workers: int, timeout: float = 30) -> None:
        return None


@pytest.fixture
def boot() -> Iterator[Callable[[str], BootingServer]]:
    servers: list[BootingServer] = []

    def start(url: str) -> BootingServer:
        server = BootingServer(url, workers=2)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def migrate_all_but_last(url: str) -> None:
    """The database as the previous release left it: every migration but the newest."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pixstream_migration (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations()[:-1]:
            with conn.transaction():
                conn.execute(migration.sql)  # type: ignore[arg-type]
                conn.execute(
                    "INSERT INTO pixstream_migration (name) VALUES (%s)", (migration.name,)
                )


def ledger(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return sorted(name for (name,) in conn.execute("SELECT name FROM pixstream_migration"))


def probe(server: Server, path: str) -> Reply | None:
    try:
        return server.http.request("GET", path, fresh=True)
    except OSError:
        return None


def hold_lock(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    return conn


def assert_no_crash_loop(server: Server) -> None:
    log = server.output()
    assert server.process.poll() is None, log
    assert "WORKER TIMEOUT" not in log, log
    assert log.count("Booting worker") == 2, log


@pytest.mark.faults
def test_boot_behind_a_held_lock_is_live_then_ready(
    scratch_database: str, boot: Callable[[str], BootingServer]
) -> None:
    url = scratch_database
    migrate_all_but_last(url)
    holder = hold_lock(url)
    try:
        server = boot(url)
        live = wait_for(
            lambda: (r := probe(server, "/healthz")) is not None and r.status == 200,
            timeout=15,
            interval=0.1,
            what="/healthz 200 while the migration lock is held",
        )
        assert live
        for _ in range(4):  # every worker says the same: fresh connections
            reply = probe(server, "/readyz")
            assert reply is not None and reply.status == 503, reply
            detail = reply.json()["detail"]
            assert f"schema migration in progress: waiting for {ALL[-1]}" in detail, detail
            assert reply.header("Retry-After")
        assert ledger(url) == ALL[:-1]
    finally:
        holder.close()  # the release phase went away: the workers take the migration over

    wait_for(
        lambda: all((r := probe(server, "/readyz")) and r.status == 200 for _ in range(4)),
        timeout=15,
        interval=0.1,
        what="/readyz 200 once the lock is released",
    )
    assert ledger(url) == ALL
    assert_no_crash_loop(server)


@pytest.mark.faults
def test_boot_behind_a_held_lock_with_a_current_schema_is_ready(
    database_url: str, boot: Callable[[str], BootingServer]
) -> None:
    holder = hold_lock(database_url)
    try:
        server = boot(database_url)
        wait_for(
            lambda: all((r := probe(server, "/readyz")) and r.status == 200 for _ in range(4)),
            timeout=20,
            interval=0.1,
            what="/readyz 200 while the migration lock is held",
        )
        assert_no_crash_loop(server)
    finally:
        holder.close()
