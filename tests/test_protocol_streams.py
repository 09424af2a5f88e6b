"""Contract tests for protocol.md, "Streams and the limit of 6" and "Delivery guarantees".

State is checked in PostgreSQL where the protocol speaks of confirmation:
a batch is confirmed when its pull has ``confirmed_at``; a message is back in
the queue when its ``pull_id`` is NULL.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from httpclient import HttpClient, Reply
from pixstream.config import DEFAULTS
from pixstream.errors import ConfigError
from problems import assert_problem

ISPB = "32074986"
OTHER = "60701190"
START = f"/api/pix/{ISPB}/stream/start"
MULTIPART = "multipart/json"
PULL_NEXT = re.compile(r"/api/pix/(?P<ispb>[0-9]{8})/stream/(?P<id>[a-z0-9]{12,})")

# Short long polls for tests that meet a 204; no expiry within a test.
# The pool timeout must stay under the window + 2 s (config validation).
QUICK = {"LONG_POLL_SECONDS": 0.3, "STREAM_IDLE_SECONDS": 30, "POOL_TIMEOUT_SECONDS": 1}
# Streams expire after 1 s without a request; the sweeper is kept out of the way.
EXPIRING = {
    "LONG_POLL_SECONDS": 0.2,
    "STREAM_IDLE_SECONDS": 1,
    "POOL_TIMEOUT_SECONDS": 1,
    "SWEEP_SECONDS": 600,
}


# -- helpers -----------------------------------------------------------------


def queue(client: FlaskClient, ispb: str, number: int) -> None:
    response = client.post(f"/api/util/msgs/{ispb}/{number}")
    assert response.status_code == 201, response.data
    assert response.get_json() == {"inserted": number}


def read(client: FlaskClient, path: str, accept: str | None = None) -> Any:
    return client.get(path, headers={} if accept is None else {"Accept": accept})


def pull_next(response: Any) -> str:
    value = response.headers.get("Pull-Next")
    assert value is not None, f"{response.status_code} without Pull-Next: {response.data!r}"
    assert PULL_NEXT.fullmatch(value), value
    return value


def pull_id(path: str) -> str:
    match = PULL_NEXT.fullmatch(path)
    assert match is not None, path
    return match["id"]


def e2e(response: Any) -> list[str]:
    if response.status_code == 204:
        return []
    body = response.get_json()
    return [m["endToEndId"] for m in (body if isinstance(body, list) else [body])]


def all_in_order(db: Any, ispb: str = ISPB) -> list[str]:
    rows = db.execute(
        "SELECT end_to_end_id FROM pix_message WHERE recipient_ispb = %s ORDER BY id", (ispb,)
    )
    return [value for (value,) in rows]


def queued(db: Any) -> set[str]:
    rows = db.execute("SELECT end_to_end_id FROM pix_message WHERE pull_id IS NULL")
    return {value for (value,) in rows}


def confirmed(db: Any, path: str) -> bool:
    row = db.execute(
        "SELECT confirmed_at IS NOT NULL FROM pix_pull WHERE id = %s", (pull_id(path),)
    ).fetchone()
    assert row is not None, f"no pull {path}"
    return bool(row[0])


def open_streams(db: Any, ispb: str = ISPB) -> int:
    row = db.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
    ).fetchone()
    return int(row[0])


def drain(client: FlaskClient, path: str, accept: str | None = None) -> tuple[list[str], str]:
    """Follow Pull-Next until a 204; the endToEndIds delivered and the last Pull-Next."""
    delivered: list[str] = []
    while True:
        response = read(client, path, accept)
        assert response.status_code in (200, 204), response.data
        delivered += e2e(response)
        path = pull_next(response)
        if response.status_code == 204:
            return delivered, path


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle_for(db: Any, seconds: float) -> Callable[[], bool]:
    """True once every open stream went ``seconds`` without a request (database clock)."""

    def condition() -> bool:
        row = db.execute(
            "SELECT bool_and(last_seen_at < now() - make_interval(secs => %s)) "
            "FROM pix_stream WHERE closed_at IS NULL",
            (seconds,),
        ).fetchone()
        return bool(row[0])

    return condition


@pytest.fixture
def quick(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(**QUICK).test_client()


# -- opening and following -------------------------------------------------------


def test_start_opens_a_stream(quick, db):
    queue(quick, ISPB, 1)
    response = read(quick, START)
    assert response.status_code == 200
    assert open_streams(db) == 1
    assert open_streams(db, OTHER) == 0
    empty = read(quick, f"/api/pix/{OTHER}/stream/start")
    assert empty.status_code == 204
    assert open_streams(db, OTHER) == 1


@pytest.mark.parametrize("accept", [None, MULTIPART])
def test_following_pull_next_confirms_the_previous_batch(quick, db, accept):
    queue(quick, ISPB, 25)
    first = read(quick, START, accept)
    x = pull_next(first)
    assert not confirmed(db, x), "a batch is confirmed only by the next call"
    in_flight = set(e2e(first))
    assert not in_flight & queued(db)
    second = read(quick, x, accept)
    assert second.status_code == 200
    assert confirmed(db, x)
    assert not confirmed(db, pull_next(second))
    assert not set(e2e(second)) & in_flight
    rest, _ = drain(quick, pull_next(second), accept)
    delivered = e2e(first) + e2e(second) + rest
    assert delivered == all_in_order(db), "nothing redelivered, nothing skipped"
    counts = db.execute("SELECT DISTINCT delivery_count FROM pix_message").fetchall()
    assert counts == [(1,)]


def test_sequential_drain_delivers_exactly_once(quick, db):
    client = quick
    queue(client, ISPB, 35)
    sizes = []
    delivered: list[str] = []
    response = read(client, START, MULTIPART)
    while response.status_code == 200:
        sizes.append(len(response.get_json()))
        delivered += e2e(response)
        response = read(client, pull_next(response), MULTIPART)
    assert response.status_code == 204
    assert sizes == [10, 10, 10, 5]
    assert delivered == all_in_order(db)
    assert len(set(delivered)) == 35
    # The final 204 call confirmed the last batch: nothing in flight, nothing queued.
    unconfirmed = db.execute(
        "SELECT count(*) FROM pix_message m JOIN pix_pull p ON p.id = m.pull_id "
        "WHERE p.confirmed_at IS NULL"
    ).fetchone()
    assert unconfirmed == (0,)
    assert queued(db) == set()
    assert db.execute("SELECT DISTINCT delivery_count FROM pix_message").fetchall() == [(1,)]


def test_two_streams_of_one_ispb_never_share_messages(quick, db):
    queue(quick, ISPB, 20)
    a = read(quick, START, MULTIPART)
    b = read(quick, START, MULTIPART)  # e.g. a repeated start: a second stream
    assert pull_next(a) != pull_next(b)
    c = read(quick, pull_next(a), MULTIPART)
    d = read(quick, pull_next(b), MULTIPART)
    batches = [e2e(r) for r in (a, b, c, d)]
    assert [len(batch) for batch in batches] == [10, 10, 0, 0]
    assert sorted(batches[0] + batches[1]) == sorted(all_in_order(db))


# -- closing ---------------------------------------------------------------------


def test_delete_answers_empty_object_and_closes_the_stream(quick, db):
    queue(quick, ISPB, 2)
    first = read(quick, START)
    response = quick.delete(pull_next(first))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.get_json() == {}
    assert open_streams(db) == 0
    row = db.execute("SELECT close_reason FROM pix_stream").fetchone()
    assert row == ("deleted",)


def test_ids_of_a_deleted_stream_answer_410(quick):
    queue(quick, ISPB, 3)
    first = read(quick, START)
    x = pull_next(first)
    second = read(quick, x)
    y = pull_next(second)
    assert quick.delete(y).status_code == 200
    # Repeating the DELETE just made (its answer lost) answers the same.
    repeat = quick.delete(y)
    assert repeat.status_code == 200
    assert repeat.get_json() == {}
    for path in (x, y):
        assert_problem(read(quick, path), 410)
        assert_problem(read(quick, path, MULTIPART), 410)
    assert_problem(quick.delete(x), 410)


def test_delete_with_the_current_id_confirms_its_batch(quick, db):
    queue(quick, ISPB, 4)
    first = read(quick, START)
    second = read(quick, pull_next(first))
    y = pull_next(second)
    assert quick.delete(y).status_code == 200
    assert confirmed(db, y)
    later = read(quick, START, MULTIPART)
    assert later.status_code == 200
    assert e2e(later) == all_in_order(db)[2:], "the deleted stream's batches are not redelivered"


def test_delete_with_the_first_id_confirms_the_first_batch(quick, db):
    queue(quick, ISPB, 2)
    first = read(quick, START)
    assert quick.delete(pull_next(first)).status_code == 200
    later = read(quick, START, MULTIPART)
    assert e2e(later) == all_in_order(db)[1:]


@pytest.mark.parametrize("accept", [None, MULTIPART])
def test_delete_with_the_previous_id_returns_the_unconfirmed_batch(quick, db, accept):
    queue(quick, ISPB, 25)
    first = read(quick, START, accept)
    x = pull_next(first)
    second = read(quick, x, accept)  # delivered with Y; the client "never saw" it
    y = pull_next(second)
    lost = e2e(second)
    assert lost
    response = quick.delete(x)
    assert response.status_code == 200
    assert response.get_json() == {}
    assert set(lost) <= queued(db), "the unconfirmed batch is back in the queue"
    assert_problem(read(quick, y), 410)
    again, _ = drain(quick, START, accept)
    assert again[: len(lost)] == lost, "the next reader gets those same messages first"
    assert not set(e2e(first)) & set(again), "the confirmed batch is not redelivered"
    assert e2e(first) + again == all_in_order(db)


def test_ispb_with_leading_zeros(quick):
    ispb = "00000000"
    queue(quick, ispb, 2)
    first = read(quick, f"/api/pix/{ispb}/stream/start")
    assert first.status_code == 200
    assert first.get_json()["recebedor"]["ispb"] == ispb
    x = pull_next(first)
    assert x.startswith(f"/api/pix/{ispb}/stream/")
    second = read(quick, x)
    assert second.status_code == 200
    assert second.get_json()["recebedor"]["ispb"] == ispb
    assert quick.delete(pull_next(second)).status_code == 200


# -- not found -----------------------------------------------------------------


def test_id_of_another_ispb_is_404_and_leaves_the_stream_alone(quick, db):
    queue(quick, ISPB, 2)
    first = read(quick, START)
    x = pull_id(pull_next(first))
    assert_problem(read(quick, f"/api/pix/{OTHER}/stream/{x}"), 404)
    assert_problem(quick.delete(f"/api/pix/{OTHER}/stream/{x}"), 404)
    assert not confirmed(db, pull_next(first))
    second = read(quick, pull_next(first))
    assert second.status_code == 200
    assert e2e(first) + e2e(second) == all_in_order(db)


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_unknown_well_formed_id_is_404(quick, method):
    queue(quick, ISPB, 1)
    assert read(quick, START).status_code == 200  # a stream exists; this id is not one of its
    response = quick.open(f"/api/pix/{ISPB}/stream/abcdefghijklmnopqrstuvwx", method=method)
    assert_problem(response, 404)


@pytest.mark.parametrize(
    "interation_id",
    [
        "ABCDEFGHIJKLMNOPQRSTUVWX",  # upper case
        "abc123",  # too short
        "abcdefghijk",  # 11 chars
        "abc-def-ghi-jkl-mno",
        "abcdefghijkl%20",
        "a" * 65,
        "abcdefghijklmnop.json",
    ],
)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_malformed_id_is_404(quick, method, interation_id):
    response = quick.open(f"/api/pix/{ISPB}/stream/{interation_id}", method=method)
    assert_problem(response, 404)


def test_a_malformed_form_of_a_real_id_is_404(quick):
    queue(quick, ISPB, 1)
    x = pull_id(pull_next(read(quick, START)))
    for variant in (x.upper(), x[:-1], x + "-", x + " "):
        assert_problem(read(quick, f"/api/pix/{ISPB}/stream/{variant}"), 404)


# -- the limit of streams per ISPB ---------------------------------------------------


def test_protocol_defaults():
    assert DEFAULTS["LONG_POLL_SECONDS"] == 8
    assert DEFAULTS["STREAM_IDLE_SECONDS"] == 60
    assert DEFAULTS["MAX_STREAMS_PER_ISPB"] == 6
    assert DEFAULTS["MAX_BATCH"] == 10


@pytest.mark.parametrize(("long_poll", "idle"), [(5, 5), (5, 4)])
def test_idle_window_must_be_longer_than_the_long_poll(make_app, long_poll, idle):
    with pytest.raises(ConfigError, match="STREAM_IDLE_SECONDS"):
        make_app(LONG_POLL_SECONDS=long_poll, STREAM_IDLE_SECONDS=idle)


def test_seventh_stream_is_429_with_retry_after(quick, db):
    queue(quick, ISPB, 6)
    for _ in range(6):
        assert read(quick, START).status_code == 200
    refused = read(quick, START)
    assert_problem(refused, 429)
    retry_after = refused.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    assert "Pull-Next" not in refused.headers
    assert open_streams(db) == 6
    # The limit is per ISPB.
    assert read(quick, f"/api/pix/{OTHER}/stream/start").status_code == 204


def test_stream_limit_setting_is_respected(make_app, db):
    client = make_app(MAX_STREAMS_PER_ISPB=2, **QUICK).test_client()
    queue(client, ISPB, 3)
    first = read(client, START)
    assert read(client, START).status_code == 200
    assert_problem(read(client, START), 429)
    assert open_streams(db) == 2
    # A closed stream stops counting: a new start succeeds.
    assert client.delete(pull_next(first)).status_code == 200
    assert read(client, START).status_code == 200
    assert_problem(read(client, START), 429)


def test_delete_frees_a_slot_under_the_default_limit(quick, db):
    queue(quick, ISPB, 7)
    paths = [pull_next(read(quick, START)) for _ in range(6)]
    assert_problem(read(quick, START), 429)
    assert quick.delete(paths[3]).status_code == 200
    assert open_streams(db) == 5
    assert read(quick, START).status_code == 200
    assert_problem(read(quick, START), 429)


# -- expiry ----------------------------------------------------------------------


def test_idle_stream_answers_410_frees_its_slot_and_gives_back_its_batch(make_app, db):
    client = make_app(MAX_STREAMS_PER_ISPB=1, **EXPIRING).test_client()
    queue(client, ISPB, 3)
    first = read(client, START)
    x = pull_next(first)
    held = e2e(first)
    assert_problem(read(client, START), 429)
    wait_until(idle_for(db, EXPIRING["STREAM_IDLE_SECONDS"]), 10, "the stream to go idle")
    assert_problem(read(client, x), 410)
    assert_problem(client.delete(x), 410)
    # The slot is free and the unconfirmed message goes to the next reader.
    after = read(client, START, MULTIPART)
    assert after.status_code == 200
    assert e2e(after) == held + all_in_order(db)[1:]
    redelivered = db.execute(
        "SELECT delivery_count FROM pix_message WHERE end_to_end_id = %s", (held[0],)
    ).fetchone()
    assert redelivered == (2,)


def test_expiry_frees_the_slot_at_the_next_start(make_app, db):
    client = make_app(MAX_STREAMS_PER_ISPB=1, **EXPIRING).test_client()
    queue(client, ISPB, 2)
    held = e2e(read(client, START))
    wait_until(idle_for(db, EXPIRING["STREAM_IDLE_SECONDS"]), 10, "the stream to go idle")
    # No request on the idle stream itself: starting anew is enough.
    after = read(client, START, MULTIPART)
    assert after.status_code == 200
    assert e2e(after) == held + all_in_order(db)[1:]
    assert open_streams(db) == 1


def test_sweeper_expires_abandoned_streams_without_any_request(make_app, db):
    client = make_app(MAX_STREAMS_PER_ISPB=1, **{**EXPIRING, "SWEEP_SECONDS": 0.2}).test_client()
    queue(client, ISPB, 1)
    first = read(client, START)
    held = set(e2e(first))

    def expired() -> bool:
        row = db.execute("SELECT close_reason FROM pix_stream").fetchone()
        return row == ("expired",)

    wait_until(expired, 10, "the sweeper to expire the stream")
    assert held <= queued(db), "its unconfirmed batch is back in the queue"
    assert open_streams(db) == 0
    assert_problem(read(client, pull_next(first)), 410)


def test_a_stream_in_use_does_not_expire(make_app, db):
    client = make_app(**EXPIRING).test_client()
    queue(client, ISPB, 5)
    response = read(client, START)
    started = time.monotonic()
    # Keep using the stream for longer than its idle window, one request at a time.
    while time.monotonic() - started < EXPIRING["STREAM_IDLE_SECONDS"] * 1.5:
        response = read(client, pull_next(response))
        assert response.status_code in (200, 204)
    assert open_streams(db) == 1


# -- retries -----------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, MULTIPART], ids=["single", "multipart"])
@pytest.mark.parametrize("depth", [1, 2], ids=["id-from-start", "later-id"])
def test_repeating_the_last_request_gives_the_same_answer(quick, db, accept, depth):
    queue(quick, ISPB, 45)
    response = read(quick, START, accept)
    delivered = e2e(response)
    path = pull_next(response)
    for _ in range(depth - 1):
        response = read(quick, path, accept)
        delivered += e2e(response)
        path = pull_next(response)
    answer = read(quick, path, accept)  # the request whose answer the client "lost"
    assert answer.status_code == 200
    retry = read(quick, path, accept)
    assert retry.status_code == answer.status_code
    assert retry.data == answer.data
    assert retry.headers["Pull-Next"] == answer.headers["Pull-Next"]
    assert retry.mimetype == "application/json"
    # Retrying again is still the same answer.
    assert read(quick, path, accept).data == answer.data
    delivered += e2e(retry)
    # Following on: nothing skipped, nothing twice.
    after = read(quick, pull_next(retry), accept)
    assert after.status_code == 200
    delivered += e2e(after)
    # Now `path` is older than the request just made: superseded.
    assert_problem(read(quick, path, accept), 410)
    assert_problem(quick.delete(path), 410)
    rest, _ = drain(quick, pull_next(after), accept)
    assert delivered + rest == all_in_order(db)


def test_repeated_answer_is_byte_identical_with_gzip(quick):
    queue(quick, ISPB, 25)
    headers = {"Accept": MULTIPART, "Accept-Encoding": "gzip"}
    x = pull_next(quick.get(START, headers=headers))
    answer = quick.get(x, headers=headers)
    retry = quick.get(x, headers=headers)
    assert answer.status_code == retry.status_code == 200
    assert retry.data == answer.data
    assert retry.headers.get("Content-Encoding") == answer.headers.get("Content-Encoding")
    assert retry.headers["Pull-Next"] == answer.headers["Pull-Next"]
    body = answer.data
    if answer.headers.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    assert len(json.loads(body)) == 10


def test_retrying_a_204_is_fine(quick):
    empty = read(quick, START)
    assert empty.status_code == 204
    p = pull_next(empty)
    first = read(quick, p)
    retry = read(quick, p)
    assert (first.status_code, retry.status_code) == (204, 204)
    assert pull_next(retry) == pull_next(first)
    queue(quick, ISPB, 1)
    assert read(quick, pull_next(retry)).status_code == 200


def test_after_a_204_the_id_before_it_is_superseded(quick):
    queue(quick, ISPB, 1)
    x = pull_next(read(quick, START))
    # GET X was answered 200 with Y; GET Y answered 204: the client's last request is GET Y.
    queue(quick, ISPB, 1)
    second = read(quick, x)
    y = pull_next(second)
    empty = read(quick, y)
    assert empty.status_code == 204
    assert_problem(read(quick, x), 410)
    assert read(quick, y).status_code == 204  # the latest request may still be repeated


# -- under real concurrency --------------------------------------------------------


@pytest.mark.server
def test_limit_holds_under_twenty_concurrent_starts(start_server, db):
    server = start_server(LONG_POLL_SECONDS=1, STREAM_IDLE_SECONDS=30, POOL_TIMEOUT_SECONDS=1)
    barrier = threading.Barrier(20)
    replies: list[Reply] = []
    lock = threading.Lock()

    def starter() -> None:
        http = HttpClient(server.base)
        try:
            barrier.wait(10)
            reply = http.get(START)
            with lock:
                replies.append(reply)
        finally:
            http.close()

    threads = [threading.Thread(target=starter, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert len(replies) == 20
    statuses = sorted(reply.status for reply in replies)
    assert statuses == [204] * 6 + [429] * 14
    for reply in replies:
        if reply.status == 429:
            assert reply.header("Content-Type") == "application/problem+json"
            assert (reply.header("Retry-After") or "").isdigit()
        else:
            assert PULL_NEXT.fullmatch(reply.pull_next or "")
    assert open_streams(db) == 6
    server.http.close()
