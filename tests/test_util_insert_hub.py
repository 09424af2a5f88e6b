"""A big util insert must not block the gevent hub, and is all-or-nothing.

``POST /api/util/msgs/{ispb}/100000`` builds and COPYs 100,000 rows in the
request's greenlet. Done in one go it holds the hub for a second or more, and
every long poll of that worker stalls; done in batches of separate
transactions, a failure leaves a partial insert behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg
import pytest
from flask import Flask

from _streamkit import (
    app_name,
    close_all,
    copy_rows,
    e2e_ids,
    message_rows,
    new_ispb,
    wait_for,
    warm_up,
)
from httpclient import HttpClient, Reply
from pixstream import seeding
from problems import assert_problem

# The target is 50 ms (a benchmark's business); measured here with the
# fix: at most about 40 ms on a quiet machine, 130 ms once in a CI run on a
# slower one (the test prints every latency). The bound catches a hub blocked
# for the insert's length (seconds), and the worst of the code that generated
# on the hub (211 ms).
MAX_PUSH_SECONDS = 0.2
BIG = 100_000


def count(db: psycopg.Connection, ispb: str) -> int:
    (n,) = db.execute(
        "SELECT count(*) FROM pix_message WHERE recipient_ispb = %s", (ispb,)
    ).fetchone()  # type: ignore[misc]
    return int(n)


def copy_running(db: psycopg.Connection, name: str) -> bool:
    """True while one of the server's connections runs a COPY (the util insert)."""
    (n,) = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND state = 'active' AND query ILIKE 'COPY%%'",
        (name,),
    ).fetchone()  # type: ignore[misc]
    return bool(n)


def collector_waiting(db: psycopg.Connection, ispb: str) -> Callable[[], bool]:
    def check() -> bool:
        (n,) = db.execute(
            "SELECT count(*) FROM pix_stream "
            "WHERE ispb = %s AND closed_at IS NULL AND replay_pull IS NULL",
            (ispb,),
        ).fetchone()  # type: ignore[misc]
        return bool(n == 1)

    return check


def timed_get(client: HttpClient, path: str) -> tuple[Reply, float]:
    reply = client.get(path)
    return reply, time.perf_counter()


def timed_post(client: HttpClient, path: str) -> tuple[Reply, float]:
    reply = client.post(path)
    return reply, time.perf_counter()


@pytest.mark.server
def test_waiting_collector_gets_its_push_while_a_big_util_insert_runs(
    start_server, db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    server = start_server(workers=1, UTIL_ROUTES=True, LONG_POLL_SECONDS=5, STREAM_IDLE_SECONDS=10)
    warm_up(server.base, db, name, workers=1)
    a, b = new_ispb(), new_ispb()
    inserter = HttpClient(server.base, timeout=60)
    collector = HttpClient(server.base, timeout=15)
    # The first insert of a process builds the generator's name pools: not under test.
    assert inserter.post(f"/api/util/msgs/{new_ispb()}/1").status == 201

    latencies: list[float] = []
    pull = f"/api/pix/{b}/stream/start"
    try:
        with ThreadPoolExecutor(2) as pool:
            started = time.perf_counter()
            big: Future[tuple[Reply, float]] = pool.submit(
                timed_post, inserter, f"/api/util/msgs/{a}/{BIG}"
            )
            wait_for(lambda: copy_running(db, name) or big.done(), timeout=10, what="the COPY")
            while not big.done() and len(latencies) < 20:
                waiting = pool.submit(timed_get, collector, pull)
                wait_for(collector_waiting(db, b), timeout=10, what="the collector to wait")
                rows = message_rows(b, 1)
                sent = time.perf_counter()
                copy_rows(db, rows)
                reply, answered = waiting.result(timeout=10)
                assert reply.status == 200, (reply.status, reply.body[:300])
                assert e2e_ids(reply) == [rows[0][0]]
                if big.done():
                    break  # the push may have been answered after the insert: not counted
                latencies.append(answered - sent)
                pull = reply.pull_next
            done, finished = big.result(timeout=60)
    finally:
        close_all([inserter, collector, server.http])
    ms = [round(x * 1000, 1) for x in latencies]
    print(f"\npushes during a {BIG:,}-message util insert ({finished - started:.2f} s), ms: {ms}")
    assert done.status == 201, (done.status, done.body[:300])
    assert done.json() == {"inserted": BIG}
    assert count(db, a) == BIG
    assert len(latencies) >= 3, f"too few pushes measured during the insert: {ms}"
    assert max(latencies) <= MAX_PUSH_SECONDS, ms


def test_a_util_insert_that_fails_part_way_leaves_nothing(
    make_app: Callable[..., Flask], db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The insert's deadline passes after chunks were already written: 503, no row left.

    A deliberately tiny deadline makes the real database cancel the COPY
    (statement_timeout) while rows are still streaming in; without gevent
    (this test client) psycopg learns of it when the COPY ends.
    """
    ispb = new_ispb()
    client = make_app().test_client()
    assert client.post(f"/api/util/msgs/{new_ispb()}/1").status_code == 201  # name pools
    monkeypatch.setattr(seeding, "util_insert_deadline", lambda count, pool_timeout: 0.3)
    made: list[int] = []
    make_chunk = seeding._make_chunk

    def counted(*args: object) -> list[tuple[object, ...]]:
        rows = make_chunk(*args)  # type: ignore[arg-type]
        made.append(len(rows))
        return rows

    monkeypatch.setattr(seeding, "_make_chunk", counted)
    assert_problem(client.post(f"/api/util/msgs/{ispb}/{BIG}"), 503)
    assert sum(made) >= 2 * seeding.CHUNK_ROWS  # rows were streamed before the failure
    assert count(db, ispb) == 0
