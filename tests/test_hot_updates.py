"""The updates every read makes are HOT (in place, no new index entries), where the
columns allow: the stream's last-seen time and pulls, and a pull's confirmation.

PostgreSQL counts a backend's HOT updates per table as they happen
(pg_stat_get_xact_tuples_hot_updated, until it reports them), so each
statement is checked by the difference it makes, on a row whose page has
room (migration 0006's fillfactor), as in service.
"""

from __future__ import annotations

import psycopg

from _streamkit import insert_messages, new_ispb
from pixstream import store


def hot_and_all_updates(conn: psycopg.Connection, table: str) -> tuple[int, int]:
    return conn.execute(
        "SELECT pg_stat_get_xact_tuples_hot_updated(%s::regclass),"
        " pg_stat_get_xact_tuples_updated(%s::regclass)",
        (table, table),
    ).fetchone()


def test_stream_and_pull_updates_of_a_read_are_hot(database_url: str) -> None:
    ispb = new_ispb()
    with psycopg.connect(database_url, autocommit=True) as conn:
        insert_messages(conn, ispb, 2)
        with conn.transaction():
            stream_id = store.insert_stream(conn, ispb, "hotpull000000001", idempotency_key=None)
            store.confirm_claim_advance(
                conn, ispb, stream_id=stream_id, used="hotpull000000001",
                pull="hotpull000000002", limit=10, answer_in=8.0,
            )  # fmt: skip
        steps = [
            ("pix_pull", lambda: store.confirm_pull(conn, "hotpull000000002")),
            # Nothing left to claim: the read only supersedes the stream's replay.
            ("pix_stream", lambda: store.confirm_claim_advance(
                conn, ispb, stream_id=stream_id, used="hotpull000000002",
                pull="hotpull000000003", limit=10, answer_in=8.0)),
            ("pix_stream", lambda: store.touch_stream(conn, stream_id)),
            ("pix_stream", lambda: store.touch_quiet_streams(
                conn, [(stream_id, "hotpull000000002", 8.0)])),
        ]  # fmt: skip
        for table, update in steps:
            with conn.transaction():
                # Counted since the backend last reported: take the difference.
                hot0, updated0 = hot_and_all_updates(conn, table)
                update()
                hot, updated = hot_and_all_updates(conn, table)
            assert (hot - hot0, updated - updated0) == (1, 1), (table, hot, updated)
