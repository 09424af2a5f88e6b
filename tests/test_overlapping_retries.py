"""Retries that overlap the request they repeat, through real gunicorn servers.

Clients retry while their first request is still being served or still
waiting (a client timeout shorter than the long poll, a proxy's retry, two
threads of a collector after a reconnect). Every such repeat must get the
answer the first request gets; requests racing on neighbouring ids of one
stream get what the contract says (200, 204 or 410), never a 404 for an id the
server issued.

The race these tests guard: the statement that locks a stream used to join
the stream to the row of its *current* pull. When a concurrent request moved
the stream on and committed, PostgreSQL re-checked the locked stream row with
its new current pull but the old joined pull row; the join no longer held and
the id read as unknown (404).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psycopg
import pytest

from _streamkit import (
    MULTIPART,
    close_all,
    e2e_ids,
    insert_messages,
    metric,
    new_ispb,
    wait_for,
)
from httpclient import HttpClient, Reply
from problems import assert_problem

pytestmark = pytest.mark.server

ROUNDS = 15


@contextmanager
def connected_clients(bases: list[str], count: int) -> Iterator[list[HttpClient]]:
    """``count`` keep-alive clients spread over ``bases``, each already connected,
    so that a barrier releases requests rather than TCP handshakes."""
    clients = [HttpClient(bases[i % len(bases)], timeout=20) for i in range(count)]
    try:
        for client in clients:
            assert client.get("/healthz").status == 200
        yield clients
    finally:
        close_all(clients)


def all_at_once(
    clients: list[HttpClient], requests: list[tuple[str, str, str | None]]
) -> list[Reply]:
    """Send ``requests[i]`` (method, path, Accept) on ``clients[i]``, released together."""
    barrier = threading.Barrier(len(requests))

    def send(i: int) -> Reply:
        method, path, accept = requests[i]
        barrier.wait(timeout=10)
        return clients[i].request(method, path, {"Accept": accept} if accept else None)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, range(len(requests))))


def fresh_id(http: HttpClient, db: psycopg.Connection, ispb: str, *, queued: int = 3) -> str:
    """A new stream's first Pull-Next, not used yet: it holds one message, and
    ``queued`` more wait for the request that uses it."""
    insert_messages(db, ispb, 1)
    reply = http.get(f"/api/pix/{ispb}/stream/start")
    assert reply.status == 200 and reply.pull_next, reply
    insert_messages(db, ispb, queued)
    return reply.pull_next


def assert_identical(replies: list[Reply]) -> Reply:
    """Every reply the same 200: status, Pull-Next and body byte for byte."""
    first = replies[0]
    seen = Counter((r.status, r.pull_next, r.body) for r in replies)
    assert len(seen) == 1, [(r.status, r.pull_next, r.body[:120]) for r in replies]
    assert first.status == 200, (first.status, first.body[:300])
    return first


def unconfirmed_or_twice(db: psycopg.Connection, ispb: str) -> tuple[int, int]:
    """Messages of ``ispb`` not confirmed, and messages delivered more than once."""
    (unconfirmed, repeated) = db.execute(
        """
        SELECT count(*) FILTER (WHERE p.confirmed_at IS NULL),
               count(*) FILTER (WHERE m.delivery_count > 1)
        FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id
        WHERE m.recipient_ispb = %s
        """,
        (ispb,),
    ).fetchone()
    return int(unconfirmed), int(repeated)


def open_streams(db: psycopg.Connection, ispb: str) -> int:
    (count,) = db.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
    ).fetchone()
    return int(count)


def identical_gets_on_fresh_ids(bases: list[str], db: psycopg.Connection, copies: int) -> None:
    ispb = new_ispb()
    with connected_clients(bases, copies) as clients:
        for _ in range(ROUNDS):
            pull = fresh_id(clients[0], db, ispb)
            replies = all_at_once(clients, [("GET", pull, MULTIPART)] * copies)
            answer = assert_identical(replies)
            assert len(e2e_ids(answer)) == 3
            assert clients[0].delete(answer.pull_next).status == 200
    assert unconfirmed_or_twice(db, ispb) == (0, 0)
    assert open_streams(db, ispb) == 0


def test_identical_requests_on_a_fresh_id_all_get_the_same_answer(server, db):
    identical_gets_on_fresh_ids([server.base], db, copies=16)


def test_identical_requests_on_two_instances_get_the_same_answer(start_server, db):
    a, b = start_server(workers=1), start_server(workers=1)
    identical_gets_on_fresh_ids([a.base, b.base], db, copies=2)


def waiting_requests(http: HttpClient) -> float:
    """The server's count of reads waiting for a message now (all its workers)."""
    for line in http.get("/metrics").body.decode().splitlines():
        if line.startswith("pixstream_waiting_requests "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.parametrize("instances", [1, 2])
def test_identical_long_polls_waiting_on_one_id_all_get_the_message(start_server, db, instances):
    servers = [
        start_server(workers=2, LONG_POLL_SECONDS=6, STREAM_IDLE_SECONDS=10)
        for _ in range(instances)
    ]
    ispb = new_ispb()
    waiters = 3
    with connected_clients([s.base for s in servers], waiters) as clients:
        pull = fresh_id(clients[0], db, ispb, queued=0)
        for _ in range(5):
            with ThreadPoolExecutor(waiters) as pool:
                pending = [pool.submit(c.get, pull, MULTIPART) for c in clients]
                wait_for(
                    lambda: sum(waiting_requests(s.http) for s in servers) >= waiters,
                    timeout=5,
                    what="every identical request waiting",
                )
                sent = insert_messages(db, ispb, 1)
                replies = [future.result(timeout=10) for future in pending]
            answer = assert_identical(replies)
            assert e2e_ids(answer) == sent
            pull = answer.pull_next
        assert clients[0].delete(pull).status == 200
    close_all([s.http for s in servers])
    assert unconfirmed_or_twice(db, ispb) == (0, 0)


def race(
    bases: list[str],
    db: psycopg.Connection,
    make_requests: Callable[[HttpClient, str], list[tuple[str, str, str | None]]],
    check: Callable[[list[Reply]], None],
) -> list[list[Reply]]:
    """Rounds of racing requests on one fresh stream each; ``check`` judges each round."""
    ispb = new_ispb()
    rounds = []
    with connected_clients(bases, 2) as clients:
        for _ in range(ROUNDS):
            requests = make_requests(clients[0], ispb)
            replies = all_at_once(clients, requests)
            for reply in replies:
                assert reply.status != 404, (reply.status, reply.body[:300])
            check(replies)
            rounds.append(replies)
            # Whatever the order, the stream is closed (or the round closes it) and
            # no batch stays bound to it.
            if open_streams(db, ispb):
                latest = replies[-1]
                assert latest.status in (200, 204) and latest.pull_next, latest.status
                assert clients[0].delete(latest.pull_next).status == 200
            assert open_streams(db, ispb) == 0
    # Anything handed back is read again; then nothing is left unconfirmed.
    with connected_clients(bases[:1], 1) as (client,):
        reply = client.get(f"/api/pix/{ispb}/stream/start", MULTIPART)
        while reply.status == 200:
            reply = client.get(reply.pull_next, MULTIPART)
        assert client.delete(reply.pull_next).status == 200
    assert unconfirmed_or_twice(db, ispb)[0] == 0
    return rounds


@pytest.mark.parametrize("instances", [1, 2])
def test_delete_racing_get_on_the_same_id_closes_the_stream(start_server, db, instances):
    servers = [start_server(workers=2) for _ in range(instances)]

    def requests(http: HttpClient, ispb: str) -> list[tuple[str, str, str | None]]:
        pull = fresh_id(http, db, ispb)
        return [("DELETE", pull, None), ("GET", pull, MULTIPART)]

    def check(replies: list[Reply]) -> None:
        deleted, read = replies
        assert deleted.status == 200 and deleted.json() == {}, (deleted.status, deleted.body)
        if read.status != 200:  # the DELETE went first
            assert_problem(read, 410)

    rounds = race([s.base for s in servers], db, requests, check)
    close_all([s.http for s in servers])
    orders = Counter(replies[1].status for replies in rounds)
    print(f"\nGET racing DELETE: {dict(orders)}")


@pytest.mark.parametrize("instances", [1, 2])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_the_previous_id_racing_the_latest_never_reads_as_unknown(
    start_server, db, instances, method
):
    servers = [start_server(workers=2) for _ in range(instances)]

    def requests(http: HttpClient, ispb: str) -> list[tuple[str, str, str | None]]:
        previous = fresh_id(http, db, ispb)
        latest = http.get(previous, MULTIPART)
        assert latest.status == 200 and latest.pull_next
        # Queued messages, so that GET latest moves the stream on (the change
        # that made the request on the previous id read as unknown), not waits.
        insert_messages(db, ispb, 2)
        return [(method, previous, MULTIPART), ("GET", latest.pull_next, MULTIPART)]

    def check(replies: list[Reply]) -> None:
        old, new = replies
        assert new.status in (200, 204, 410), (new.status, new.body[:300])
        if new.status == 410:  # the DELETE of the previous id went first and closed it
            assert method == "DELETE" and old.status == 200, old.status
        if old.status not in (200, 204):
            assert_problem(old, 410)  # superseded by the latest id's use

    race([s.base for s in servers], db, requests, check)
    close_all([s.http for s in servers])


def test_concurrent_repeats_of_delete_close_the_stream_once(server, db):
    ispb = new_ispb()
    closed = metric(server.http, "pixstream_streams_closed_total")
    confirmed_before = metric(server.http, "pixstream_messages_confirmed_total")
    with connected_clients([server.base], 12) as clients:
        for _ in range(ROUNDS):
            pull = fresh_id(clients[0], db, ispb, queued=0)
            replies = all_at_once(clients, [("DELETE", pull, None)] * len(clients))
            for reply in replies:
                assert reply.status == 200 and reply.json() == {}, (reply.status, reply.body)
            assert open_streams(db, ispb) == 0
    # Each stream closed once and each batch confirmed once, by the server's
    # own counts: the repeats replayed the first DELETE's answer.
    assert metric(server.http, "pixstream_streams_closed_total") - closed == ROUNDS
    confirmed_now = metric(server.http, "pixstream_messages_confirmed_total")
    assert confirmed_now - confirmed_before == ROUNDS
    close_all([server.http])
    # Each batch confirmed exactly once and never handed out again.
    assert unconfirmed_or_twice(db, ispb) == (0, 0)
    (confirmed,) = db.execute(
        "SELECT count(*) FROM pix_message m JOIN pix_pull p ON p.id = m.pull_id"
        " WHERE m.recipient_ispb = %s AND p.confirmed_at IS NOT NULL",
        (ispb,),
    ).fetchone()
    assert confirmed == ROUNDS  # the message each start delivered
