"""Footprint: WAL and disk per message, inserted and then delivered, for the capacity model.

Inserts ``--count`` generated messages over ``--ispbs`` ISPBs (COPY, in
batches of 1,000, as the util route and ``flask seed-pix`` do; one
notification per batch and ISPB), then collects every one through the stream
service in process, in batches of 10 (a start, then reads that confirm each
batch and claim the next: the service's own transactions). For each phase:
WAL bytes written (``pg_current_wal_lsn`` before and after, after a
CHECKPOINT, so full-page images are counted as after any checkpoint), and
the size of every table and index, then again after a VACUUM.

    python bench/footprint.py [--count 50000] [--ispbs 100]

Uses DATABASE_URL when set, else a scratch database on the local server,
else an embedded one. Prints one JSON line.
"""

from __future__ import annotations

import time

import psycopg
from psycopg_pool import ConnectionPool

import _common as c
from pixstream import create_app, migrate, seeding
from pixstream.runtime import runtime

TABLES = ("pix_message", "pix_pull", "pix_stream")


def wal_lsn(conn: psycopg.Connection) -> int:
    (lsn,) = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(lsn)


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    """Bytes of each table (heap, with TOAST) and of each of its indexes."""
    found = {}
    for table in TABLES:
        (heap,) = conn.execute("SELECT pg_table_size(%s::regclass)", (table,)).fetchone()
        found[table] = int(heap)
        for name, size in conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid)"
            " FROM pg_index WHERE indrelid = %s::regclass",
            (table,),
        ):
            found[name] = int(size)
    return found


def per_message(before: dict[str, int], after: dict[str, int], count: int) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0)) / count, 1) for k in after}


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--count", type=int, default=50_000)
    args.add_argument("--ispbs", type=int, default=100)
    opts = args.parse_args()
    ispbs = [c.random_ispb() for _ in range(opts.ispbs)]
    with c.database() as db:
        migrate.upgrade(db.url)
        with psycopg.connect(db.url, autocommit=True) as conn:
            empty = sizes(conn)
            conn.execute("CHECKPOINT")
            wal0 = wal_lsn(conn)
            started = time.perf_counter()
            with ConnectionPool(db.url, min_size=1, max_size=1, open=True) as pool:
                for index, ispb in enumerate(ispbs):
                    share = opts.count // len(ispbs) + (index < opts.count % len(ispbs))
                    seeding.insert_random(pool, ispb, share, batch_size=1000)
            insert_seconds = time.perf_counter() - started
            wal1 = wal_lsn(conn)
            inserted = sizes(conn)
            conn.execute("CHECKPOINT")
            wal2 = wal_lsn(conn)

            app = create_app({"DATABASE_URL": db.url, "LONG_POLL_SECONDS": 0.1,
                              "POOL_TIMEOUT_SECONDS": 1, "SWEEP_SECONDS": 3600})  # fmt: skip
            with app.app_context():
                streams = runtime().streams
            started = time.perf_counter()
            delivered = answers = 0
            for ispb in ispbs:
                delivery = streams.start(ispb, 10)
                answers += 1
                while delivery.documents:
                    delivered += len(delivery.documents)
                    delivery = streams.pull(ispb, delivery.pull_next, 10)
                    answers += 1
                streams.close(ispb, delivery.pull_next)
            deliver_seconds = time.perf_counter() - started
            with app.app_context():
                runtime().stop()
            wal3 = wal_lsn(conn)
            collected = sizes(conn)
            for table in TABLES:
                conn.execute(f"VACUUM {table}")
            vacuumed = sizes(conn)
    assert delivered == opts.count, (delivered, opts.count)
    count = opts.count
    c.emit(
        {
            "bench": "footprint",
            "database": db.kind,
            "messages": count,
            "ispbs": opts.ispbs,
            "insert": {
                "seconds": round(insert_seconds, 2),
                "wal_bytes_per_message": round((wal1 - wal0) / count),
                "bytes_per_message": per_message(empty, inserted, count),
                "total_bytes_per_message": round(
                    (sum(inserted.values()) - sum(empty.values())) / count
                ),
            },
            "deliver": {
                "seconds": round(deliver_seconds, 2),
                "answers": answers,
                "wal_bytes_per_message": round((wal3 - wal2) / count),
                "total_bytes_per_message_after": round(
                    (sum(collected.values()) - sum(empty.values())) / count
                ),
                "total_bytes_per_message_after_vacuum": round(
                    (sum(vacuumed.values()) - sum(empty.values())) / count
                ),
                "bytes_per_message_after_vacuum": per_message(empty, vacuumed, count),
            },
        }
    )


if __name__ == "__main__":
    main()
