"""``Idempotency-Key`` on stream/start, through real gunicorn servers and PostgreSQL.

A start is the one request whose lost answer could not be repeated: the
repeat opened a second stream, and the first stayed an orphan holding a slot
and its first batch until it expired. With the header, every copy of a start
is served as a read of the first pull id of the key's stream: the same
status, body and Pull-Next, one stream. Without it, nothing changed.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from _streamkit import MULTIPART, e2e_ids, insert_messages, new_ispb, wait_for
from httpclient import HttpClient, Reply
from problems import assert_problem
from test_overlapping_retries import (
    connected_clients,
    open_streams,
    unconfirmed_or_twice,
    waiting_requests,
)

pytestmark = pytest.mark.server


def start(http: HttpClient, ispb: str, key: str | None = None, accept: str | None = None) -> Reply:
    """GET stream/start, with ``key`` as the Idempotency-Key header when given."""
    headers = {}
    if key is not None:
        headers["Idempotency-Key"] = key
    if accept is not None:
        headers["Accept"] = accept
    return http.request("GET", f"/api/pix/{ispb}/stream/start", headers)


def answer(reply: Reply) -> tuple[int, str | None, bytes]:
    """What a repeat must reproduce: status, Pull-Next, body byte for byte."""
    return reply.status, reply.pull_next, reply.body


def streams(db: psycopg.Connection, ispb: str) -> int:
    """Every stream the ISPB ever had, open or not."""
    (count,) = db.execute("SELECT count(*) FROM pix_stream WHERE ispb = %s", (ispb,)).fetchone()
    return int(count)


def delivered_twice(db: psycopg.Connection, ispb: str) -> int:
    return unconfirmed_or_twice(db, ispb)[1]


def test_a_repeated_start_gets_the_same_answer_and_opens_no_stream(server, db):
    ispb = new_ispb()
    sent = insert_messages(db, ispb, 3)
    first = start(server.http, ispb, "collector-1-start-0001", MULTIPART)
    assert first.status == 200 and e2e_ids(first) == sent
    repeat = start(server.http, ispb, "collector-1-start-0001", MULTIPART)
    assert answer(repeat) == answer(first)
    assert repeat.header("Content-Type") == first.header("Content-Type")
    assert repeat.header("Cache-Control") == "no-store"
    assert streams(db, ispb) == 1
    assert delivered_twice(db, ispb) == 0
    # The answer's Pull-Next continues the one stream as usual. Only a start
    # reads the header: a GET of an id is a repeatable read already.
    following = server.http.request("GET", first.pull_next, {"Idempotency-Key": ""})
    assert following.status == 204
    assert server.http.delete(following.pull_next).status == 200
    assert unconfirmed_or_twice(db, ispb) == (0, 0)


def test_a_repeated_start_after_a_204_gets_the_same_204(start_server, db):
    server = start_server(LONG_POLL_SECONDS=0.5, POOL_TIMEOUT_SECONDS=2)
    ispb = new_ispb()
    first = start(server.http, ispb, "k-204")
    assert first.status == 204 and first.body == b""
    repeat = start(server.http, ispb, "k-204")
    assert answer(repeat) == answer(first)
    assert streams(db, ispb) == 1
    # A 204's Pull-Next is the stream's first id: the repeat read it, like the first.
    assert first.pull_next is not None
    assert first.pull_next == repeat.pull_next


def test_a_repeat_overlapping_the_first_start_in_its_long_poll_gets_its_message(start_server, db):
    server = start_server(workers=2, LONG_POLL_SECONDS=6, STREAM_IDLE_SECONDS=10)
    ispb = new_ispb()
    with connected_clients([server.base], 2) as (original, retry), ThreadPoolExecutor(2) as pool:
        first = pool.submit(start, original, ispb, "k-overlap", MULTIPART)
        wait_for(lambda: waiting_requests(server.http) >= 1, timeout=5, what="the start waiting")
        again = pool.submit(start, retry, ispb, "k-overlap", MULTIPART)
        wait_for(lambda: waiting_requests(server.http) >= 2, timeout=5, what="the repeat waiting")
        sent = insert_messages(db, ispb, 1)
        replies = [first.result(timeout=10), again.result(timeout=10)]
    assert replies[0].status == 200, replies[0]
    assert answer(replies[1]) == answer(replies[0])
    assert e2e_ids(replies[0]) == sent
    assert streams(db, ispb) == 1
    assert delivered_twice(db, ispb) == 0


@pytest.mark.parametrize("instances", [1, 2])
def test_a_lost_answer_repeated_at_once_many_times_opens_one_stream(start_server, db, instances):
    """Eight copies of one keyed start, all at once over ``instances`` servers."""
    servers = [start_server(workers=2) for _ in range(instances)]
    ispb = new_ispb()
    sent = insert_messages(db, ispb, 4)
    copies = 8
    with connected_clients([s.base for s in servers], copies) as clients:
        barrier = threading.Barrier(copies)

        def send(client: HttpClient) -> Reply:
            barrier.wait(timeout=10)
            return start(client, ispb, "k-lost-answer", MULTIPART)

        with ThreadPoolExecutor(copies) as pool:
            replies = list(pool.map(send, clients))
    seen = Counter(answer(r) for r in replies)
    assert len(seen) == 1, [(r.status, r.pull_next, r.body[:100]) for r in replies]
    assert replies[0].status == 200 and e2e_ids(replies[0]) == sent
    assert streams(db, ispb) == 1
    assert delivered_twice(db, ispb) == 0


def test_a_repeat_of_the_start_that_took_the_sixth_slot_is_not_refused(server, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 8)  # every start answers at once
    for _ in range(5):
        assert start(server.http, ispb).status == 200
    sixth = start(server.http, ispb, "k-sixth")
    assert sixth.status == 200
    repeat = start(server.http, ispb, "k-sixth")
    assert answer(repeat) == answer(sixth)
    assert open_streams(db, ispb) == 6
    assert_problem(start(server.http, ispb, "k-seventh"), 429, retry_after=True)
    assert_problem(start(server.http, ispb), 429, retry_after=True)
    assert open_streams(db, ispb) == 6


@pytest.mark.parametrize("queued", [1, 2], ids=["next-was-empty", "next-delivered"])
def test_a_key_whose_stream_went_past_its_first_answer_is_a_409(server, db, queued):
    ispb = new_ispb()
    insert_messages(db, ispb, queued)
    first = start(server.http, ispb, "k-used")
    assert first.status == 200
    following = server.http.get(first.pull_next)  # confirms the first batch
    assert following.status == (200 if queued == 2 else 204)
    problem = assert_problem(start(server.http, ispb, "k-used"), 409)
    assert problem["type"] == "urn:pixstream:problem:idempotency-key-used"
    assert problem["title"] == "Idempotency key already used"
    assert "k-used" not in problem["detail"]  # no header value in a problem body
    assert streams(db, ispb) == 1
    # The stream itself is untouched: it goes on with the latest Pull-Next.
    assert server.http.delete(following.pull_next).status == 200
    assert unconfirmed_or_twice(db, ispb) == (0, 0)


def test_after_a_204_the_repeat_is_a_read_of_the_first_id(server, db):
    """A start's 204 hands out the stream's first id; what a GET of it delivers, a
    repeated start replays, as a repeat of that GET would."""
    ispb = new_ispb()
    first = start(server.http, ispb, "k-after-204")
    assert first.status == 204
    sent = insert_messages(db, ispb, 1)
    following = server.http.get(first.pull_next)
    assert following.status == 200 and e2e_ids(following) == sent
    assert answer(start(server.http, ispb, "k-after-204")) == answer(following)
    assert streams(db, ispb) == 1


def test_a_key_is_free_again_once_its_stream_is_closed(server, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 2)
    first = start(server.http, ispb, "k-closed")
    assert answer(start(server.http, ispb, "k-closed")) == answer(first)
    assert server.http.delete(first.pull_next).status == 200
    second = start(server.http, ispb, "k-closed")
    assert second.status == 200 and second.pull_next != first.pull_next
    assert answer(start(server.http, ispb, "k-closed")) == answer(second)
    assert streams(db, ispb) == 2 and open_streams(db, ispb) == 1


def test_a_key_is_free_again_once_its_stream_expired(server, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 1)
    first = start(server.http, ispb, "k-expired")
    assert first.status == 200
    # Idle for longer than the idle window: the next start of the ISPB expires it.
    db.execute(
        "UPDATE pix_stream SET last_seen_at = now() - interval '1 hour' WHERE ispb = %s", (ispb,)
    )
    second = start(server.http, ispb, "k-expired")
    # The expired stream's unconfirmed message came back, to the new stream.
    assert second.status == 200 and e2e_ids(second) == e2e_ids(first)
    assert second.pull_next != first.pull_next
    assert streams(db, ispb) == 2 and open_streams(db, ispb) == 1
    assert answer(start(server.http, ispb, "k-expired")) == answer(second)


def test_one_key_on_two_ispbs_names_two_streams(server, db):
    ours, theirs = new_ispb(), new_ispb()
    insert_messages(db, ours, 1)
    insert_messages(db, theirs, 1)
    a = start(server.http, ours, "k-shared")
    b = start(server.http, theirs, "k-shared")
    assert a.status == b.status == 200
    assert e2e_ids(a) != e2e_ids(b)
    assert answer(start(server.http, ours, "k-shared")) == answer(a)
    assert answer(start(server.http, theirs, "k-shared")) == answer(b)
    assert streams(db, ours) == streams(db, theirs) == 1


INVALID_KEYS = {
    "empty": "",
    "empty-quoted": '""',
    "256": "k" * 256,
    "256-quoted": '"' + "k" * 256 + '"',
    "non-ascii": "k\u00e9y",  # latin-1 on the wire
    "control": "k\x01y",
    "tab": "k\ty",
    "space": "k y",
    "quote": 'k"y',
    "backslash": "k\\y",
    "unbalanced": '"ky',
}


def test_an_invalid_key_is_a_400_and_opens_no_stream(server, db):
    ispb = new_ispb()
    for case, value in INVALID_KEYS.items():
        reply = start(server.http, ispb, value)
        assert reply.status == 400, case
        problem = assert_problem(reply, 400)
        # Named by pixstream, or, for a control character, by gunicorn before it.
        assert "idempotency-key" in problem["detail"].lower(), case
        assert value not in problem["detail"] or not value, case  # no header value echoed
    assert streams(db, ispb) == 0


def test_a_key_sent_as_utf8_bytes_is_a_400(server, db):
    ispb = new_ispb()
    key = "chave-\u00e7\u00e3o".encode()  # raw UTF-8 on the wire, not latin-1
    reply = server.http.request(
        "GET",
        f"/api/pix/{ispb}/stream/start",
        {"Idempotency-Key": key},  # type: ignore[dict-item]
    )
    assert_problem(reply, 400)
    assert streams(db, ispb) == 0


def test_the_quoted_and_the_bare_form_are_one_key(server, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 1)
    longest = "k" * 254 + "~"
    first = start(server.http, ispb, f'"{longest}"')
    assert first.status == 200
    assert answer(start(server.http, ispb, longest)) == answer(first)
    assert streams(db, ispb) == 1
    (key,) = db.execute(
        "SELECT idempotency_key FROM pix_stream WHERE ispb = %s", (ispb,)
    ).fetchone()
    assert key == longest


def test_without_the_header_every_start_opens_a_stream(server, db):
    ispb = new_ispb()
    insert_messages(db, ispb, 4)
    plain = [start(server.http, ispb) for _ in range(2)]
    assert [r.status for r in plain] == [200, 200]
    assert plain[0].pull_next != plain[1].pull_next
    assert streams(db, ispb) == 2
    keyed = [start(server.http, ispb, "k-plain") for _ in range(2)]
    assert answer(keyed[0]) == answer(keyed[1])
    assert streams(db, ispb) == 3
