"""Push-driven waiting: wake-up latency, the lost wake-up race, and a killed listener.

A waiting request must be woken by the LISTEN connection of its process within
milliseconds of the inserting commit, whoever inserts (a plain SQL client or
another server instance), whatever the interleaving, and even after the
listener's backend is killed.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg import sql

from _streamkit import (
    app_name,
    close_all,
    copy_rows,
    e2e_ids,
    insert_messages,
    listener_pids,
    message_rows,
    new_ispb,
    wait_for,
    warm_up,
)
from conftest import with_dbname
from httpclient import HttpClient, Reply
from pixstream import store
from pixstream.runtime import runtime

# A window far longer than any acceptable wake-up: an answer within the bound
# can only come from a notification, never from the end-of-window re-check.
WINDOW = {"LONG_POLL_SECONDS": 5, "STREAM_IDLE_SECONDS": 10}
MAX_WAKEUP_SECONDS = 0.1


def timed_get(client: HttpClient, path: str) -> tuple[Reply, float]:
    """GET, and the perf_counter instant the answer was in."""
    reply = client.get(path)
    return reply, time.perf_counter()


def streams_waiting(db: psycopg.Connection, ispbs: list[str]) -> Callable[[], bool]:
    """True once every ISPB's stream has made an empty claim and is waiting.

    An empty claim clears replay_pull in the same transaction that precedes the
    wait (and the request subscribed before it), so from then on an insert must
    wake the request.
    """

    def check() -> bool:
        (count,) = db.execute(
            "SELECT count(*) FROM pix_stream "
            "WHERE ispb = ANY(%s) AND closed_at IS NULL AND replay_pull IS NULL",
            (ispbs,),
        ).fetchone()
        return bool(count == len(ispbs))

    return check


def measure_wakeups(
    collector: HttpClient,
    db: psycopg.Connection,
    ispb: str,
    insert: Callable[[], tuple[list[str], float]],
    samples: int,
) -> list[float]:
    """Seconds from the start of each insert to the waiting collector's answer.

    ``insert`` returns the endToEndIds it committed and the perf_counter instant
    its statement (or request) was sent: preparing the data is not counted.
    """
    latencies = []
    pull = f"/api/pix/{ispb}/stream/start"
    with ThreadPoolExecutor(1) as pool:
        for _ in range(samples):
            waiting: Future[tuple[Reply, float]] = pool.submit(timed_get, collector, pull)
            wait_for(streams_waiting(db, [ispb]), timeout=5, what="the collector to wait")
            assert not waiting.done()
            expected, inserted_at = insert()
            reply, answered_at = waiting.result(timeout=10)
            assert reply.status == 200, (reply.status, reply.body[:300])
            assert e2e_ids(reply) == expected
            latencies.append(answered_at - inserted_at)
            pull = reply.pull_next
    return latencies


def sql_insert(db: psycopg.Connection, ispb: str) -> Callable[[], tuple[list[str], float]]:
    def insert() -> tuple[list[str], float]:
        rows = message_rows(ispb, 1)
        sent = time.perf_counter()
        copy_rows(db, rows)
        return [str(rows[0][0])], sent

    return insert


def report(label: str, latencies: list[float]) -> None:
    ms = [round(x * 1000, 1) for x in latencies]
    print(f"\n{label}: wake-ups in ms {ms}, median {statistics.median(ms):.1f}, max {max(ms)}")


@pytest.mark.server
def test_waiting_collector_is_woken_by_a_commit_on_another_connection(
    start_server, db, monkeypatch
):
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    server = start_server(workers=2, **WINDOW)
    warm_up(server.base, db, name, workers=2)
    ispb = new_ispb()
    collector = HttpClient(server.base, timeout=15)
    try:
        latencies = measure_wakeups(collector, db, ispb, sql_insert(db, ispb), samples=5)
    finally:
        close_all([collector, server.http])
    report("SQL insert -> waiting collector", latencies)
    assert max(latencies) < MAX_WAKEUP_SECONDS, latencies


@pytest.mark.server
def test_waiting_collector_is_woken_by_an_insert_through_another_instance(
    start_server, db, monkeypatch
):
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    a = start_server(workers=2, **WINDOW)
    monkeypatch.setenv("PGAPPNAME", app_name())
    b = start_server(workers=1, **WINDOW)
    warm_up(a.base, db, name, workers=2)
    ispb = new_ispb()
    collector, inserter = HttpClient(a.base, timeout=15), HttpClient(b.base, timeout=15)

    def insert_through_b() -> tuple[list[str], float]:
        sent = time.perf_counter()
        reply = inserter.post(f"/api/util/msgs/{ispb}/1")
        assert reply.status == 201
        (e2e,) = db.execute(
            "SELECT end_to_end_id FROM pix_message WHERE recipient_ispb = %s "
            "ORDER BY id DESC LIMIT 1",
            (ispb,),
        ).fetchone()
        return [e2e], sent

    try:
        # B's first insert builds its generator's name pools: not part of a wake-up.
        assert inserter.post(f"/api/util/msgs/{new_ispb()}/1").status == 201
        latencies = measure_wakeups(collector, db, ispb, insert_through_b, samples=5)
    finally:
        close_all([collector, inserter, a.http, b.http])
    report("POST on instance B -> collector waiting on A", latencies)
    assert max(latencies) < MAX_WAKEUP_SECONDS, latencies


def test_commit_between_the_empty_claim_and_the_wait_is_not_lost(
    make_app, database_url, monkeypatch
):
    """The lost wake-up race, forced: the insert commits, and the listener fans
    its notification out, after the request's first claim found nothing and
    before the request starts to wait. Subscribing only after that claim would
    leave this request asleep for the whole window."""
    app = make_app(**WINDOW)
    with app.app_context():
        listener = runtime().listener
    assert listener.wait_connected(5)
    ispb = new_ispb()

    # Observe the process's own listener handing the notification out (not a
    # second LISTEN connection: that could see it before this one does).
    fanned_out = threading.Event()
    wake = listener._wake

    def observed_wake(target: str) -> None:
        wake(target)
        if target == ispb:
            fanned_out.set()

    monkeypatch.setattr(listener, "_wake", observed_wake)

    claim = store.confirm_claim_advance
    race: dict[str, Any] = {"claims": 0}

    def claim_then_commit_elsewhere(
        conn: psycopg.Connection, claim_ispb: str, **params: Any
    ) -> store.Read:
        claimed = claim(conn, claim_ispb, **params)
        if claim_ispb == ispb:
            race["claims"] += 1
            if race["claims"] == 1:
                race["first_claim_empty"] = not claimed.claimed.documents
                with psycopg.connect(database_url, autocommit=True) as other:
                    race["inserted"] = insert_messages(other, ispb, 1)
                race["fanned_out"] = fanned_out.wait(5)
        return claimed

    monkeypatch.setattr(store, "confirm_claim_advance", claim_then_commit_elsewhere)
    client = app.test_client()
    started = time.monotonic()
    reply = client.get(f"/api/pix/{ispb}/stream/start")
    elapsed = time.monotonic() - started

    assert race.get("first_claim_empty") is True
    assert race.get("fanned_out") is True, "the listener never got the notification"
    assert reply.status_code == 200, (reply.status_code, reply.data[:300])
    assert [reply.get_json()["endToEndId"]] == race["inserted"]
    assert race["claims"] == 2
    assert elapsed < 1, f"the wake-up was lost: answered after {elapsed:.2f} s"


@pytest.mark.server
def test_waiting_collectors_survive_their_listener_being_killed(
    start_server, db, database_url, monkeypatch
):
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    server = start_server(workers=2, LONG_POLL_SECONDS=6, STREAM_IDLE_SECONDS=12)
    warm_up(server.base, db, name, workers=2)
    ispbs = [new_ispb() for _ in range(4)]
    clients = [HttpClient(server.base, timeout=20) for _ in ispbs]
    pulls = [f"/api/pix/{ispb}/stream/start" for ispb in ispbs]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:

            def wait_all() -> list[Future[tuple[Reply, float]]]:
                futures = [
                    pool.submit(timed_get, client, pull)
                    for client, pull in zip(clients, pulls, strict=True)
                ]
                wait_for(streams_waiting(db, ispbs), timeout=5, what="all collectors to wait")
                return futures

            # 1. Kill every listener backend while the collectors wait, keep them
            #    from reconnecting, and commit an insert per ISPB meanwhile. A
            #    LISTEN connection of the test (as another instance's listener
            #    would) reads those notifications, so PostgreSQL does not replay
            #    them to a LISTEN issued later: they are lost to this server,
            #    whose listener must wake every waiter when it gets back.
            futures = wait_all()
            killed = listener_pids(db, name)
            assert len(killed) == 2, killed
            allow = sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}")
            dbname = sql.Identifier(db.info.dbname)
            admin_url = with_dbname(database_url, "postgres")  # no database can close itself
            with (
                psycopg.connect(database_url, autocommit=True) as sentinel,
                psycopg.connect(admin_url, autocommit=True) as admin,
            ):
                sentinel.execute("LISTEN pix_inserted")
                admin.execute(allow.format(dbname, sql.SQL("false")))
                try:
                    (terminated,) = db.execute(
                        "SELECT bool_and(pg_terminate_backend(pid, 5000)) "
                        "FROM unnest(%s::int[]) AS pid",
                        (list(killed),),
                    ).fetchone()
                    assert terminated
                    expected = [insert_messages(db, ispb, 1) for ispb in ispbs]
                    seen: set[str] = set()
                    for notify in sentinel.notifies(timeout=5):
                        seen.add(notify.payload)
                        if seen >= set(ispbs):
                            break
                    assert seen >= set(ispbs)
                    assert not any(future.done() for future in futures), "woken without listener"
                finally:
                    admin.execute(allow.format(dbname, sql.SQL("true")))
                unblocked_at = time.perf_counter()
                after_reconnect = []
                for future, want in zip(futures, expected, strict=True):
                    reply, answered_at = future.result(timeout=10)
                    assert e2e_ids(reply) == want
                    after_reconnect.append(answered_at - unblocked_at)
            pulls = [future.result()[0].pull_next for future in futures]
            report("messages committed while no listener was up", after_reconnect)
            assert max(after_reconnect) < 2, after_reconnect

            # 2. The listeners are back (new backends), and push works as before.
            wait_for(
                lambda: len(listener_pids(db, name) - killed) == 2,
                timeout=5,
                what="two new listener backends",
            )
            futures = wait_all()
            inserted_at = time.perf_counter()
            expected = [insert_messages(db, ispb, 1) for ispb in ispbs]
            reconnected = []
            for future, want in zip(futures, expected, strict=True):
                reply, answered_at = future.result(timeout=10)
                assert e2e_ids(reply) == want
                reconnected.append(answered_at - inserted_at)
            report("insert after the listeners reconnected", reconnected)
            assert max(reconnected) < 0.5, reconnected

        # 3. Every worker reports ready again.
        streak = [0]

        def ready_in_a_row() -> bool:
            probe = HttpClient(server.base, timeout=10)
            ok = probe.request("GET", "/readyz", fresh=True).status == 200
            streak[0] = streak[0] + 1 if ok else 0
            return streak[0] >= 8

        wait_for(ready_in_a_row, timeout=10, interval=0.02, what="/readyz 200 on every worker")
    finally:
        close_all([*clients, server.http])
