"""Retention (PIXSTREAM_RETENTION_HOURS): confirmed history goes, nothing else does.

Confirmed messages, the pulls they leave empty and closed streams are removed
once older than the retention (here one second), in batches, by one process
at a time; unconfirmed messages, whatever their age, and open streams stay,
and an open stream keeps working on the ids it has handed out.
"""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest
from flask import Flask

from _streamkit import insert_messages, new_ispb, wait_for
from pixstream.runtime import runtime
from pixstream.streams import StreamService

RETAIN = {
    "RETENTION_HOURS": 1 / 3600,  # one second
    "LONG_POLL_SECONDS": 0.3,
    "POOL_TIMEOUT_SECONDS": 1,
    "SWEEP_SECONDS": 3600,  # the test purges; the sweeper keeps out of the way
}


@pytest.fixture
def streams(make_app: Callable[..., Flask]) -> StreamService:
    app = make_app(**RETAIN)
    with app.app_context():
        return runtime().streams


def drain(streams: StreamService, ispb: str) -> str:
    """Open a stream and collect every queued message, confirming each batch; the id
    that its last (empty) answer handed out."""
    delivery = streams.start(ispb, 10)
    while delivery.documents:
        delivery = streams.pull(ispb, delivery.pull_next, 10)
    return delivery.pull_next


def older_than_retention(db: psycopg.Connection) -> Callable[[], bool]:
    """True once every confirmation and close so far is more than a second old."""

    def check() -> bool:
        (age,) = db.execute(
            "SELECT extract(epoch FROM now() - greatest("
            " (SELECT max(confirmed_at) FROM pix_pull), (SELECT max(closed_at) FROM pix_stream)))"
        ).fetchone()
        return age is not None and age > 1.2

    return check


def counts(db: psycopg.Connection) -> tuple[int, int, int]:
    return db.execute(
        "SELECT (SELECT count(*) FROM pix_message), (SELECT count(*) FROM pix_pull),"
        " (SELECT count(*) FROM pix_stream)"
    ).fetchone()


def test_confirmed_history_goes_and_everything_unconfirmed_or_open_stays(
    streams: StreamService, db: psycopg.Connection
):
    collected, idle, held, unread = new_ispb(), new_ispb(), new_ispb(), new_ispb()
    insert_messages(db, collected, 25)
    open_id = drain(streams, collected)  # open, at an empty answer after 3 batches
    insert_messages(db, collected, 4)
    closed_id = drain(streams, collected)
    streams.close(collected, closed_id)  # a closed stream, its batches confirmed
    idle_id = streams.start(idle, 10).pull_next  # open, never delivered anything
    kept = set(insert_messages(db, held, 3))
    held_batch = streams.start(held, 10)  # delivered, not confirmed yet
    assert len(held_batch.documents) == 3
    kept |= set(insert_messages(db, unread, 5))  # never delivered
    wait_for(older_than_retention(db), timeout=10, what="the history to age")

    purged = streams.purge(batch=4)  # several batches: the walk goes on where it stopped

    assert (purged.messages, purged.streams) == (29, 1), purged
    left = {e2e for (e2e,) in db.execute("SELECT end_to_end_id FROM pix_message")}
    assert left == kept
    open_streams = db.execute(
        "SELECT current_pull FROM pix_stream WHERE closed_at IS NULL ORDER BY id"
    ).fetchall()
    assert [pull for (pull,) in open_streams] == [open_id, idle_id, held_batch.pull_next]
    assert db.execute("SELECT count(*) FROM pix_stream").fetchone() == (3,)
    # Every pull left is one a stream points at, or holds an unconfirmed batch.
    (stray,) = db.execute(
        "SELECT count(*) FROM pix_pull p WHERE NOT EXISTS (SELECT FROM pix_stream s"
        " WHERE p.id IN (s.current_pull, s.replay_pull, s.start_pull, s.closed_by_pull))"
        " AND NOT EXISTS (SELECT FROM pix_message m WHERE m.pull_id = p.id)"
    ).fetchone()
    assert stray == 0
    # Nothing else to do, and the streams left work on the ids they handed out.
    assert streams.purge() == type(purged)()
    insert_messages(db, collected, 1)
    assert len(streams.pull(collected, open_id, 10).documents) == 1
    assert streams.pull(idle, idle_id, 10).documents == []
    # The held batch is confirmed by the next call, and then it may go too (not the
    # message just delivered on the open stream: unconfirmed).
    assert streams.pull(held, held_batch.pull_next, 10).documents == []
    wait_for(older_than_retention(db), timeout=10, what="the confirmation to age")
    assert streams.purge().messages == 3


def test_nothing_younger_than_the_retention_goes(
    make_app: Callable[..., Flask], db: psycopg.Connection
):
    app = make_app(**{**RETAIN, "RETENTION_HOURS": 1})
    with app.app_context():
        streams = runtime().streams
    ispb = new_ispb()
    insert_messages(db, ispb, 12)
    streams.close(ispb, drain(streams, ispb))
    before = counts(db)
    assert streams.purge().messages == 0
    assert counts(db) == before


def test_one_process_purges_at_a_time(streams: StreamService, db: psycopg.Connection):
    ispb = new_ispb()
    insert_messages(db, ispb, 5)
    streams.close(ispb, drain(streams, ispb))
    wait_for(older_than_retention(db), timeout=10, what="the history to age")
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(7244, 0)")  # another process's turn
        assert streams.purge().messages == 0
    assert streams.purge().messages == 5
