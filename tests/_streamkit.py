"""Helpers shared by the concurrency, push and fault tests (not a test module).

Everything here drives or observes real parts: HTTP against gunicorn, SQL
against PostgreSQL. Waiting is always on a condition with a deadline.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg
import pytest

from httpclient import HttpClient, Reply
from pixstream import store
from pixstream.generator import MessageFactory

T = TypeVar("T")

MULTIPART = "multipart/json"

# What a listener backend shows in pg_stat_activity: the LISTEN itself, or the
# liveness probe it runs after a quiet probe interval. Pool connections always
# end a transaction, so they show COMMIT or ROLLBACK instead.
LISTENER_QUERIES = ("LISTEN pix_inserted", "SELECT 1")


def wait_for(
    condition: Callable[[], T], *, timeout: float, interval: float = 0.005, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)  # polling interval of a condition, not a synchronisation


def new_ispb() -> str:
    return f"{secrets.randbelow(90_000_000) + 10_000_000:08d}"


def app_name() -> str:
    """A unique application_name: set as PGAPPNAME, it tags one server's connections."""
    return f"pixstream-test-{secrets.token_hex(4)}"


def message_rows(ispb: str, count: int) -> list[tuple[object, ...]]:
    """``count`` random message rows addressed to ``ispb``, ready for copy_rows."""
    return list(MessageFactory().rows(ispb, count))


def copy_rows(conn: psycopg.Connection, rows: list[tuple[object, ...]]) -> None:
    """Insert the rows in one statement and commit."""
    with conn.transaction():
        store.copy_messages(conn, rows)


def insert_messages(conn: psycopg.Connection, ispb: str, count: int) -> list[str]:
    """Commit ``count`` messages for ``ispb`` in one statement; their endToEndIds."""
    rows = message_rows(ispb, count)
    copy_rows(conn, rows)
    return [str(row[0]) for row in rows]


def message_ids(conn: psycopg.Connection, ispb: str) -> dict[str, int]:
    """endToEndId -> pix_message.id (the insertion order) for one ISPB."""
    rows = conn.execute(
        "SELECT end_to_end_id, id FROM pix_message WHERE recipient_ispb = %s", (ispb,)
    )
    return dict(rows.fetchall())


def listener_pids(conn: psycopg.Connection, application_name: str) -> set[int]:
    """The backends of the LISTEN connections of the server tagged ``application_name``."""
    rows = conn.execute(
        """
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND application_name = %s
          AND query = ANY(%s)
        """,
        (application_name, list(LISTENER_QUERIES)),
    )
    return {pid for (pid,) in rows}


def warm_up(base: str, conn: psycopg.Connection, application_name: str, workers: int) -> None:
    """Make every worker of a server start its listener, and wait until all listen.

    Listeners start on a worker's first request, and which worker accepts a
    connection is up to the kernel: send bursts of simultaneous readiness
    checks until pg_stat_activity shows one LISTEN backend per worker.
    """

    def burst() -> None:
        def ready() -> None:
            client = HttpClient(base, timeout=10)
            try:
                client.request("GET", "/readyz", fresh=True)
            finally:
                client.close()

        threads = [threading.Thread(target=ready) for _ in range(4 * workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def all_listening() -> bool:
        if len(listener_pids(conn, application_name)) >= workers:
            return True
        burst()
        return False

    wait_for(all_listening, timeout=20, interval=0.05, what=f"{workers} listeners")


def documents(reply: Reply) -> list[dict[str, Any]]:
    """The messages of a 200 (one object or a multipart array); [] for a 204."""
    if reply.status == 204:
        return []
    assert reply.status == 200, (reply.status, reply.body[:300])
    body = reply.json()
    return body if isinstance(body, list) else [body]


def e2e_ids(reply: Reply) -> list[str]:
    return [doc["endToEndId"] for doc in documents(reply)]


def close_all(clients: Iterable[HttpClient]) -> None:
    """Close keep-alive connections, so that a server stops without waiting on them."""
    for client in clients:
        client.close()


def metric_values(http: HttpClient, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` on the server, by its labels ("" when none)."""
    values = {}
    # A fresh connection: a keep-alive one idle for 5 s (gunicorn's keepalive) is closed.
    for line in http.request("GET", "/metrics", fresh=True).body.decode().splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            sample, value = line.rsplit(" ", 1)
            values[sample[len(name) :].strip()] = float(value)
    return values


def metric(http: HttpClient, name: str) -> float:
    """Metric ``name`` on the server, its samples summed (0 when absent)."""
    return sum(metric_values(http, name).values())
