"""Concurrency of the stream protocol through real gunicorn (gevent) servers.

The limit of 6 streams under simultaneous starts, exactly-once delivery to
concurrent collectors, and one collector served alternately by two instances.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from _streamkit import (
    MULTIPART,
    app_name,
    close_all,
    e2e_ids,
    insert_messages,
    message_ids,
    new_ispb,
    warm_up,
)
from httpclient import HttpClient, Reply
from problems import assert_problem

pytestmark = pytest.mark.server


def test_twenty_simultaneous_starts_open_exactly_six_streams(start_server, db, monkeypatch):
    name = app_name()
    monkeypatch.setenv("PGAPPNAME", name)
    server = start_server(workers=2)
    warm_up(server.base, db, name, workers=2)
    ispb = new_ispb()
    clients = [HttpClient(server.base, timeout=15) for _ in range(20)]
    barrier = threading.Barrier(len(clients))

    def start(client: HttpClient) -> tuple[Reply, float]:
        # Connect first (keep-alive), so that the barrier releases requests, not handshakes.
        assert client.get("/healthz").status == 200
        barrier.wait(timeout=10)
        sent = time.monotonic()
        return client.get(f"/api/pix/{ispb}/stream/start"), sent

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            results = list(pool.map(start, clients))
    finally:
        close_all([*clients, server.http])

    replies = [reply for reply, _ in results]
    statuses = Counter(reply.status for reply in replies)
    assert statuses[200] + statuses[204] == 6, statuses
    assert statuses[429] == 14, statuses
    for reply in replies:
        if reply.status == 429:
            assert_problem(reply, 429, retry_after=True)
        else:
            assert reply.pull_next and reply.pull_next.startswith(f"/api/pix/{ispb}/stream/")
    # They really went together: all were sent before the first one was answered.
    sends = sorted(sent for _, sent in results)
    assert sends[-1] - sends[0] < min(reply.elapsed for reply in replies if reply.status != 429)
    (open_streams,) = db.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
    ).fetchone()
    assert open_streams == 6


def test_concurrent_collectors_drain_5000_messages_exactly_once_in_order(start_server, db):
    server = start_server(workers=2)
    ispb = new_ispb()
    reply = server.http.post(f"/api/util/msgs/{ispb}/5000")
    assert reply.status == 201 and reply.json() == {"inserted": 5000}
    order = message_ids(db, ispb)
    assert len(order) == 5000
    barrier = threading.Barrier(6)

    def collect(_: int) -> list[list[str]]:
        """Follow Pull-Next from start to the first 204; the batches received."""
        client = HttpClient(server.base, timeout=15)
        try:
            barrier.wait(timeout=10)
            batches = []
            reply = client.get(f"/api/pix/{ispb}/stream/start", MULTIPART)
            while reply.status == 200:
                batch = e2e_ids(reply)
                assert 1 <= len(batch) <= 10
                batches.append(batch)
                reply = client.get(reply.pull_next, MULTIPART)
            assert reply.status == 204, (reply.status, reply.body[:300])
            assert client.delete(reply.pull_next).status == 200
            return batches
        finally:
            client.close()

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        collected = list(pool.map(collect, range(6)))
    elapsed = time.monotonic() - started
    server.http.close()

    delivered = Counter(e2e for batches in collected for batch in batches for e2e in batch)
    duplicates = {e2e: n for e2e, n in delivered.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages delivered more than once"
    assert set(delivered) == set(order), f"{len(set(order) - set(delivered))} never delivered"
    for batches in collected:
        ids = [order[e2e] for batch in batches for e2e in batch]
        assert ids == sorted(ids), "a stream delivered a message before an older one"
    assert sum(1 for batches in collected if batches) >= 2, "the collectors did not share"
    (unconfirmed, redelivered) = db.execute(
        """
        SELECT count(*) FILTER (WHERE p.confirmed_at IS NULL),
               count(*) FILTER (WHERE m.delivery_count <> 1)
        FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id
        WHERE m.recipient_ispb = %s
        """,
        (ispb,),
    ).fetchone()
    assert (unconfirmed, redelivered) == (0, 0)
    print(f"\n6 collectors drained 5000 messages in {elapsed:.2f} s (incl. the final 204 window)")


def test_two_instances_serving_one_collector_alternately_keep_every_guarantee(start_server, db):
    a = start_server(workers=1)
    b = start_server(workers=1)
    ispb = new_ispb()
    order = insert_messages(db, ispb, 200)
    ca, cb = HttpClient(a.base, timeout=15), HttpClient(b.base, timeout=15)
    instances = (ca, cb)
    try:
        reply = ca.get(f"/api/pix/{ispb}/stream/start", MULTIPART)
        received = e2e_ids(reply)
        step = 1
        while reply.status == 200:
            here, there = instances[step % 2], instances[(step + 1) % 2]
            used = reply.pull_next
            reply = here.get(used, MULTIPART)
            # The client lost that answer: the same request on the other instance replays it.
            again = there.get(used, MULTIPART)
            assert (again.status, again.pull_next, again.body) == (
                reply.status,
                reply.pull_next,
                reply.body,
            )
            received += e2e_ids(reply)
            step += 1
        assert reply.status == 204
        assert step == 21  # 20 batches of 10, then the 204
        assert received == order  # every message once, oldest first
        # Closing on the other instance; the id is then gone on both.
        assert instances[step % 2].delete(reply.pull_next).status == 200
        for client in instances:
            assert_problem(client.get(reply.pull_next, MULTIPART), 410)

        # Nothing lost across instances: a stream closed on B with the id whose
        # answer (served by A) the client never saw hands that batch back.
        more = insert_messages(db, ispb, 20)
        first = cb.get(f"/api/pix/{ispb}/stream/start", MULTIPART)
        assert e2e_ids(first) == more[:10]
        unseen = ca.get(first.pull_next, MULTIPART)
        assert e2e_ids(unseen) == more[10:]
        assert cb.delete(first.pull_next).status == 200
        assert_problem(ca.get(unseen.pull_next, MULTIPART), 410)
        again = ca.get(f"/api/pix/{ispb}/stream/start", MULTIPART)
        assert e2e_ids(again) == more[10:]
        assert ca.delete(again.pull_next).status == 200
    finally:
        close_all([ca, cb, a.http, b.http])
