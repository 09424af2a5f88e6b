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
import statistics
import sys
import time

import psycopg
from psycopg_pool import ConnectionPool

from _database import scratch_database, server
from pixstream import generator, seeding

TARGET = 25_000
ISPB = "32074986"


def run_generator(url: str, count: int, batch: int) -> float:
    with ConnectionPool(url, min_size=1, max_size=2, open=True) as pool:
        pool.wait()
        started = time.perf_counter()
        inserted = seeding.insert_random(pool, ISPB, count, batch_size=batch)
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
    with (
        server() as (server_url, kind),
        scratch_database(server_url, prefix="pixstream_bench") as url,
    ):
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
