"""Idle long polls that skip the database (quiet.py), and why that is safe.

An idle stream's polls claim in the database only once in IDLE_CLAIM_EVERY;
the others trust that the process's listener heard nothing for the ISPB since
the stream's last empty claim. Every change that could make that claim's
answer wrong is notified: an insert, a batch given back, a DELETE or an
expiry, from any instance. These tests make each change on a second instance,
B, while the stream is quiet on A, and check that A answers what the
database would: the message, the replay, 410. And the last-seen times the
skipped transactions did not write are written: a stream polled only quietly
does not expire.

Each server has one worker, so that which process serves a request is known.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest

from _streamkit import (
    app_name,
    close_all,
    e2e_ids,
    listener_pids,
    metric,
    new_ispb,
    wait_for,
    warm_up,
)
from conftest import Server
from httpclient import HttpClient, Reply

pytestmark = pytest.mark.server

QUIET = {
    "LONG_POLL_SECONDS": 0.6,
    "POOL_TIMEOUT_SECONDS": 2,
    "STREAM_IDLE_SECONDS": 3,
    "SWEEP_SECONDS": 0.3,
}
CLAIM_EVERY = 5


@pytest.fixture
def start_two(
    start_server: Callable[..., Server], db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[HttpClient, HttpClient]]]:
    """Start two single-worker servers, A and B, on one database, both listening;
    their clients are returned and closed afterwards."""
    clients = []
    names: list[str] = []  # each server's application_name, as its connections show it

    def start(**settings: object) -> tuple[HttpClient, HttpClient]:
        for _ in range(2):
            name = app_name()
            names.append(name)
            monkeypatch.setenv("PGAPPNAME", name)
            server = start_server(workers=1, IDLE_CLAIM_EVERY=CLAIM_EVERY, **settings)
            warm_up(server.base, db, name, workers=1)
            clients.append(HttpClient(server.base, timeout=15))
        return clients[-2], clients[-1]

    start.names = names  # type: ignore[attr-defined]
    yield start
    close_all(clients)


@pytest.fixture
def two_instances(start_two: Callable[..., tuple[HttpClient, HttpClient]]):
    return start_two(**QUIET)


def quiet_stream(http: HttpClient, ispb: str) -> str:
    """Open a stream on ``http``'s server and poll it until a poll skipped its claim there."""
    reply = http.get(f"/api/pix/{ispb}/stream/start")
    assert reply.status == 204, reply.status
    pull_next = reply.pull_next
    assert pull_next is not None
    skipped = metric(http, "pixstream_idle_claims_skipped_total")
    reply = http.get(pull_next)  # the claim whose silence the next poll trusts
    assert (reply.status, reply.pull_next) == (204, pull_next)
    reply = http.get(pull_next)
    assert (reply.status, reply.pull_next) == (204, pull_next)
    assert metric(http, "pixstream_idle_claims_skipped_total") > skipped, "no claim was skipped"
    return pull_next


def test_idle_polls_claim_once_in_five(two_instances):
    a, _ = two_instances
    ispb = new_ispb()
    reply = a.get(f"/api/pix/{ispb}/stream/start")
    pull_next = reply.pull_next
    claims = metric(a, "pixstream_claim_duration_seconds_count")
    polls = 4 * CLAIM_EVERY
    for _ in range(polls):
        reply = a.get(pull_next)
        assert (reply.status, reply.pull_next) == (204, pull_next)
    made = metric(a, "pixstream_claim_duration_seconds_count") - claims
    # One claim in five; one more if a notification of another test's ISPB
    # collided in time (they are per ISPB: none should).
    assert made <= polls / CLAIM_EVERY + 1, made


def test_a_delete_on_another_instance_is_heard_by_a_quiet_poll(two_instances):
    """A DELETE on B notifies the ISPB: A's next poll on the closed stream is a 410,
    whether A has heard the notification before the poll arrives or while it waits."""
    a, b = two_instances
    for _ in range(3):
        ispb = new_ispb()
        pull_next = quiet_stream(a, ispb)
        assert b.delete(pull_next).status == 200
        reply = a.get(pull_next)
        assert reply.status == 410, (reply.status, reply.body[:200])


def quiet_after_a_message(a: HttpClient, ispb: str) -> str:
    """A stream on A whose next poll may skip its claim (any window length): a message
    delivered at the start, then a poll that confirms it and finds nothing."""
    assert a.post(f"/api/util/msgs/{ispb}/1").status == 201
    reply = a.get(f"/api/pix/{ispb}/stream/start")
    assert reply.status == 200
    pull_next = reply.pull_next
    assert a.get(pull_next).status == 204
    return pull_next


def poll_in_background(a: HttpClient, pull_next: str, window: float) -> Callable[[], Reply]:
    """Send a poll on A that skips its claim; once it waits, return a function that
    gives its answer (which must come within half the window)."""
    skipped = metric(a, "pixstream_idle_claims_skipped_total")
    answer: dict[str, object] = {}

    def poll() -> None:
        client = HttpClient(f"http://{a.host}:{a.port}", timeout=15)
        started = time.monotonic()
        try:
            answer["reply"] = client.get(pull_next)
        finally:
            client.close()
        answer["seconds"] = time.monotonic() - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    wait_for(
        lambda: metric(a, "pixstream_idle_claims_skipped_total") > skipped,
        timeout=window / 2, what="A's poll to skip its claim and wait",
    )  # fmt: skip

    def result() -> Reply:
        waiter.join(15)
        reply = answer["reply"]
        assert isinstance(reply, Reply)
        assert answer["seconds"] < window / 2, (reply.status, answer["seconds"])
        return reply

    return result


def test_a_delete_on_another_instance_wakes_a_quiet_poll_that_waits(start_two):
    """The close is heard while A's poll waits without having claimed: it claims
    at once and answers 410, instead of a 204 at its window's end."""
    window = 6
    a, b = start_two(LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=20)
    pull_next = quiet_after_a_message(a, new_ispb())
    answer = poll_in_background(a, pull_next, window)
    assert b.delete(pull_next).status == 200
    assert answer().status == 410


def test_a_poll_that_claimed_before_a_close_leaves_nothing_quiet_behind(start_two):
    """A's poll claimed (it confirmed a batch), then waits; B closes the stream
    meanwhile. That poll may still answer 204 (it began before the close), but
    it must not leave its id to be trusted: the next poll on A answers 410."""
    window = 2
    a, b = start_two(LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=20, POOL_TIMEOUT_SECONDS=2)
    ispb = new_ispb()
    assert a.post(f"/api/util/msgs/{ispb}/1").status == 201
    reply = a.get(f"/api/pix/{ispb}/stream/start")
    assert reply.status == 200
    pull_next = reply.pull_next
    claims = metric(a, "pixstream_claim_duration_seconds_count")
    answer: dict[str, Reply] = {}

    def poll() -> None:
        client = HttpClient(f"http://{a.host}:{a.port}", timeout=15)
        try:
            answer["reply"] = client.get(pull_next)
        finally:
            client.close()

    waiter = threading.Thread(target=poll)
    waiter.start()
    wait_for(
        lambda: metric(a, "pixstream_claim_duration_seconds_count") > claims,
        timeout=window, what="A's poll to claim (and confirm) before it waits",
    )  # fmt: skip
    assert b.delete(pull_next).status == 200
    waiter.join(15)
    assert answer["reply"].status in (204, 410)
    assert a.get(pull_next).status == 410


def test_a_close_sent_while_nobody_listened_is_found_by_the_reconnect_scan(start_two, db):
    """A close whose notification A never got (its listener was down): the scan
    after the reconnect finds the stream closed and wakes the poll trusting it,
    which answers 410 at once rather than a 204 at its window's end."""
    window = 6
    a, _ = start_two(LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=20)
    name = start_two.names[-2]
    ispb = new_ispb()
    pull_next = quiet_after_a_message(a, ispb)
    answer = poll_in_background(a, pull_next, window)
    # Closed without a notification, as if sent while A's listener was away...
    db.execute(
        "UPDATE pix_stream SET closed_at = now(), close_reason = 'deleted',"
        " closed_by_pull = current_pull WHERE ispb = %s",
        (ispb,),
    )
    # ... and A's listener is away: killed, it reconnects and scans.
    (pid,) = listener_pids(db, name)
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert answer().status == 410


def test_a_batch_taken_on_another_instance_is_replayed_by_a_quiet_poll(two_instances):
    """The stream moves on at B with a message; the retry of that read on A
    (the client lost B's answer) must replay it, not answer a quiet 204."""
    a, b = two_instances
    ispb = new_ispb()
    pull_next = quiet_stream(a, ispb)
    assert b.post(f"/api/util/msgs/{ispb}/1").status == 201
    first = b.get(pull_next)
    assert first.status == 200
    again = a.get(pull_next)
    assert (again.status, e2e_ids(again), again.pull_next) == (
        200, e2e_ids(first), first.pull_next,
    )  # fmt: skip


def test_a_message_inserted_through_another_instance_reaches_a_quiet_poll(two_instances):
    a, b = two_instances
    ispb = new_ispb()
    pull_next = quiet_stream(a, ispb)
    assert b.post(f"/api/util/msgs/{ispb}/1").status == 201
    reply = a.get(pull_next)
    assert reply.status == 200 and len(e2e_ids(reply)) == 1


def test_a_stream_polled_only_quietly_does_not_expire(two_instances, db):
    """Polls that skip their claim still count as requests: their last-seen times
    are written in batches, and B's sweeper (idle window 3 s) leaves the stream alone."""
    a, _ = two_instances
    ispb = new_ispb()
    pull_next = quiet_stream(a, ispb)
    skipped = metric(a, "pixstream_idle_claims_skipped_total")
    idle_seconds = QUIET["STREAM_IDLE_SECONDS"]
    window = QUIET["LONG_POLL_SECONDS"]
    for _ in range(round(2.5 * idle_seconds / window)):
        reply: Reply = a.get(pull_next)
        assert (reply.status, reply.pull_next) == (204, pull_next), reply.status
    assert metric(a, "pixstream_idle_claims_skipped_total") - skipped >= idle_seconds / window
    assert metric(a, "pixstream_quiet_touches_total") > 0
    # Left alone, it expires as any other stream does.
    wait_for(
        lambda: db.execute(
            "SELECT close_reason FROM pix_stream WHERE ispb = %s", (ispb,)
        ).fetchone()[0] == "expired",
        timeout=idle_seconds + 5, interval=0.1, what="the abandoned stream's expiry",
    )  # fmt: skip
    assert a.get(pull_next).status == 410
