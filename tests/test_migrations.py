"""The migration runner: each file once, in order, recorded in pixstream_migration,
safe when every worker of every host runs it at the same time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from _streamkit import insert_messages, new_ispb
from pixstream import migrate
from pixstream.runtime import runtime
from pixstream.sql import migrations

ALL = [m.name for m in migrations()]


@pytest.fixture
def empty_database(scratch_database: str) -> str:
    """A brand-new database without any schema, on the test server."""
    return scratch_database


def ledger(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM pixstream_migration")]


def test_migration_files_are_ordered_and_named() -> None:
    assert ALL, "no migration files found in the package"
    assert ALL[0] == "0001_initial"
    assert sorted(ALL) == ALL
    assert len(set(ALL)) == len(ALL)
    for name in ALL:
        assert name[:4].isdigit() and name[4] == "_", name


def test_fresh_database_then_noop(empty_database: str) -> None:
    assert migrate.upgrade(empty_database) == ALL
    assert sorted(ledger(empty_database)) == ALL
    assert migrate.upgrade(empty_database) == []
    assert sorted(ledger(empty_database)) == ALL


def test_already_migrated_database_is_a_noop(database_url: str) -> None:
    assert migrate.upgrade(database_url) == []


def test_ledger_records_application_time(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    with psycopg.connect(empty_database) as conn:
        rows = conn.execute(
            "SELECT name, applied_at <= now(), applied_at > now() - interval '1 hour'"
            " FROM pixstream_migration ORDER BY name"
        ).fetchall()
    assert [r[0] for r in rows] == ALL
    assert all(r[1] and r[2] for r in rows)


def test_recorded_files_are_not_run_again(empty_database: str) -> None:
    """The ledger, not the schema, decides: a file recorded there is skipped."""
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE pixstream_migration (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for name in ALL:
            conn.execute("INSERT INTO pixstream_migration (name) VALUES (%s)", (name,))
    assert migrate.upgrade(empty_database) == []
    with psycopg.connect(empty_database) as conn:
        (exists,) = conn.execute("SELECT to_regclass('pix_message') IS NOT NULL").fetchone()
    assert not exists, "a migration ran although the ledger recorded it"


def test_concurrent_runs_apply_each_file_once(empty_database: str) -> None:
    runners = 6
    barrier = threading.Barrier(runners)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            applied = migrate.upgrade(empty_database)
        except BaseException as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(applied)

    threads = [threading.Thread(target=run) for _ in range(runners)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a migration runner hung"
    assert errors == []
    assert len(results) == runners
    applied = sorted(name for result in results for name in result)
    assert applied == ALL, f"each file exactly once across runners, got {results}"
    # One runner did everything in order; the others found nothing to do.
    assert sorted(results, key=len) == [[]] * (runners - 1) + [ALL]
    assert sorted(ledger(empty_database)) == ALL


def test_schema_has_tables_indexes_trigger(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        indexes = {
            name: definition
            for name, definition in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
            )
        }
        triggers = conn.execute(
            "SELECT t.tgname, c.relname, p.proname, t.tgtype FROM pg_trigger t"
            " JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE NOT t.tgisinternal"
        ).fetchall()
        functions = {
            name
            for (name,) in conn.execute(
                "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            )
        }
        constraints = {
            name
            for (name,) in conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'pix_message'::regclass"
            )
        }
    assert {"pix_message", "pix_stream", "pix_pull", "pixstream_migration"} <= tables

    queued = indexes["pix_message_queued_idx"]
    assert "(recipient_ispb, id)" in queued
    assert "WHERE (pull_id IS NULL)" in queued
    assert "WHERE (pull_id IS NOT NULL)" in indexes["pix_message_pull_idx"]
    assert "(ispb)" in indexes["pix_stream_open_idx"]
    assert "WHERE (closed_at IS NULL)" in indexes["pix_stream_open_idx"]
    assert "(stream_id)" in indexes["pix_pull_stream_idx"]
    keyed = indexes["pix_stream_idempotency_key_idx"]
    assert "UNIQUE" in keyed and "(ispb, idempotency_key)" in keyed
    assert "(idempotency_key IS NOT NULL) AND (closed_at IS NULL)" in keyed
    assert "UNIQUE" in indexes["pix_message_end_to_end_id_key"]

    assert len(triggers) == 1
    name, table, function, tgtype = triggers[0]
    assert (name, table, function) == ("pix_message_inserted", "pix_message", "pix_notify_inserted")
    # tgtype bits: 1 = FOR EACH ROW (must be clear), 4 = INSERT (must be set).
    assert tgtype & 1 == 0, "the notify trigger must fire once per statement, not per row"
    assert tgtype & 4 == 4

    assert {"pix_message_document", "pix_notify_inserted"} <= functions
    assert "pix_message_pull_fk" in constraints


def test_one_open_stream_per_key_and_ispb(database_url: str) -> None:
    """The index behind Idempotency-Key: a key names one open stream of its ISPB, and is
    free again once that stream is closed; keys are checked for length."""
    insert = (
        "INSERT INTO pix_stream (ispb, current_pull, start_pull, idempotency_key)"
        " VALUES (%s, 'p', 'p', %s) RETURNING id"
    )
    with psycopg.connect(database_url, autocommit=True) as conn:
        (first,) = conn.execute(insert, ("11111111", "k")).fetchone()  # type: ignore[misc]
        conn.execute(insert, ("22222222", "k"))  # another ISPB's key
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, ("11111111", "k"))
        conn.execute(
            "UPDATE pix_stream SET closed_at = now(), close_reason = 'expired' WHERE id = %s",
            (first,),
        )
        conn.execute(insert, ("11111111", "k"))
        for key in ("", "k" * 256):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(insert, ("11111111", key))
        with pytest.raises(psycopg.errors.CheckViolation):  # a keyed stream has its first pull
            conn.execute(
                "INSERT INTO pix_stream (ispb, current_pull, idempotency_key)"
                " VALUES ('11111111', 'p', 'x')"
            )


@pytest.fixture
def lock_holder(empty_database: str) -> Iterator[psycopg.Connection]:
    """Another session holding the migration lock, as a long release migration does."""
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(7242)")
        yield conn


def test_bounded_lock_wait_gives_up_and_applies_nothing(
    empty_database: str, lock_holder: psycopg.Connection
) -> None:
    started = time.monotonic()
    with pytest.raises(migrate.LockBusy):
        migrate.upgrade(empty_database, lock_wait=0.5)
    assert 0.4 < time.monotonic() - started < 5
    with pytest.raises(migrate.LockBusy):
        migrate.upgrade(empty_database, lock_wait=0)
    assert migrate.pending(empty_database) == ALL


def test_start_behind_a_held_lock_reports_what_is_pending(
    empty_database: str, lock_holder: psycopg.Connection
) -> None:
    started = time.monotonic()
    assert migrate.upgrade_at_start(empty_database, lock_wait=0.5) == ALL
    assert time.monotonic() - started < 5, "the boot-time wait must be bounded"
    lock_holder.execute("SELECT pg_advisory_unlock(7242)")
    assert migrate.upgrade_at_start(empty_database, lock_wait=0.5) == []
    assert migrate.pending(empty_database) == []


def test_start_behind_a_held_lock_on_a_current_schema(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(7242)")
        assert migrate.upgrade_at_start(database_url, lock_wait=0.2) == []
    assert migrate.pending(database_url) == []


def test_bounded_wait_does_not_limit_the_migrations(empty_database: str) -> None:
    """lock_timeout bounds the wait for the lock only, not the locks the files then take."""
    migrate.upgrade(empty_database, lock_wait=0.05)
    assert migrate.pending(empty_database) == []


def test_a_populated_database_keeps_everything_through_the_later_migrations(
    empty_database: str, make_app
) -> None:
    """Data written under the first five migrations (queued messages, a batch
    delivered and confirmed, one delivered and not yet confirmed, an open stream)
    survives the rest, and is collected after them exactly once."""
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(migrate._CREATE_LEDGER)
        for migration in migrations():
            if migration.name >= "0006":
                break
            with conn.transaction():
                conn.execute(migration.sql)  # type: ignore[arg-type]
                conn.execute(
                    "INSERT INTO pixstream_migration (name) VALUES (%s)", (migration.name,)
                )
        ispb = new_ispb()
        sent = set(insert_messages(conn, ispb, 23))
        # A stream as the code of 0005 left it: a confirmed batch of 10, then 10 held.
        conn.execute(
            "INSERT INTO pix_stream (ispb, current_pull, start_pull)"
            " VALUES (%s, 'oldpull000000001', 'oldpull000000001')",
            (ispb,),
        )
        conn.execute(
            "INSERT INTO pix_pull (id, stream_id, size, confirmed_at) VALUES"
            " ('oldpull000000001', 1, 10, now()), ('oldpull000000002', 1, 10, NULL)"
        )
        conn.execute(
            "UPDATE pix_message SET pull_id = CASE WHEN id <= 10 THEN 'oldpull000000001'"
            " ELSE 'oldpull000000002' END, delivery_count = 1 WHERE id <= 20"
        )
        conn.execute(
            "UPDATE pix_stream SET current_pull = 'oldpull000000002',"
            " replay_pull = 'oldpull000000001'"
        )
        confirmed = {e2e for (e2e,) in conn.execute(
            "SELECT end_to_end_id FROM pix_message WHERE id <= 10")}  # fmt: skip
    assert migrate.upgrade(empty_database) == [m for m in ALL if m >= "0006"]

    app = make_app(DATABASE_URL=empty_database, LONG_POLL_SECONDS=0.3, POOL_TIMEOUT_SECONDS=1)
    with app.app_context():
        streams = runtime().streams
    replayed = streams.pull(ispb, "oldpull000000001", 10)  # the held batch, replayed
    delivery = streams.pull(ispb, replayed.pull_next, 10)  # confirms it; the last 3
    assert streams.pull(ispb, delivery.pull_next, 10).documents == []
    got = [json.loads(doc)["endToEndId"] for doc in replayed.documents + delivery.documents]
    assert len(got) == len(set(got)) == 13
    assert set(got) | confirmed == sent
