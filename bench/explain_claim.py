"""EXPLAIN (ANALYZE, BUFFERS) of the claim on a large pix_message table.

    python bench/explain_claim.py [MILLIONS] [--ispbs 20] [--queued 0.001] [--backlog 0.05]

Loads MILLIONS million messages (default 10) with generate_series SQL into a
scratch database (on DATABASE_URL's server, else an embedded PostgreSQL),
dropped afterwards unless --keep. The rows go round-robin to --ispbs ISPBs;
all but the newest --queued share are collected (bound to confirmed pulls of
ten), as in a service that has run for a while. The plans printed:

1. steady state: the claim of one ISPB, LIMIT 10 (multipart) and LIMIT 1;
2. backlog: after --backlog * rows more queued messages for that ISPB (a seed,
   or a collector that was down), the same claims again.

Each claim runs inside a transaction that is rolled back: nothing is claimed.
The last line is a JSON summary of the execution times.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import psycopg

from _database import scratch_database, server
from pixstream.sql import QUERIES

CHUNK = 1_000_000
PULL = "explainclaim000000000000"
TARGET = "32074986"

HISTORY = """
INSERT INTO pix_message (end_to_end_id, valor, payer_name, payer_cpf_cnpj, payer_ispb,
    payer_agencia, payer_conta, payer_tipo_conta, recipient_name, recipient_cpf_cnpj,
    recipient_ispb, recipient_agencia, recipient_conta, recipient_tipo_conta, campo_livre,
    tx_id, paid_at, pull_id, delivery_count)
SELECT 'E' || payer || to_char(paid, 'YYYYMMDDHH24MI') || lpad(g::text, 11, '0'),
       round((exp(8.3 + 1.3 * (random() + random() + random() - 1.5) * 2) / 100)::numeric
             + 0.01, 2),
       'Pagador ' || g, '52998224725', payer, lpad((1 + g %% 9999)::text, 4, '0'),
       (10000 + g %% 9999999)::text, 'CACC',
       'Recebedor ' || g, '11144477735', (%(ispbs)s::text[])[1 + g %% %(n_ispbs)s],
       lpad((1 + g %% 7919)::text, 4, '0'), (10000 + g %% 7654321)::text, 'SVGS',
       CASE WHEN g %% 5 = 0 THEN 'Aluguel' ELSE '' END, 'tx' || g, paid,
       CASE WHEN g <= %(collected)s::bigint THEN 'p' || lpad((g / 10)::text, 15, '0') END,
       CASE WHEN g <= %(collected)s::bigint THEN 1 ELSE 0 END
FROM (SELECT g, now() - make_interval(secs => (%(total)s::bigint - g) / 100.0) AS paid,
             (ARRAY['00000000', '60701190', '60746948', '18236120', '00360305'])[1 + g %% 5]
                 AS payer
      FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g) AS src
"""

PULLS = """
INSERT INTO pix_pull (id, stream_id, issued_at, confirmed_at)
SELECT 'p' || lpad(n::text, 15, '0'), %(stream)s::bigint, now(), now()
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n
"""


def log(message: str) -> None:
    print(f"-- {message}", file=sys.stderr, flush=True)


def bulk_session(conn: psycopg.Connection) -> None:
    """Skip FK checks and the notify trigger while loading, when allowed (superuser).

    The data is consistent by construction: every pull_id is inserted in pix_pull.
    """
    conn.execute("SET synchronous_commit = off")
    try:
        conn.execute("SET session_replication_role = replica")
        log("loading with session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        log("not a superuser: loading with FK checks and triggers on")


def load_history(conn: psycopg.Connection, total: int, queued: int, ispbs: list[str]) -> None:
    collected = total - queued
    (stream,) = conn.execute(
        "INSERT INTO pix_stream (ispb, current_pull, closed_at, close_reason)"
        " VALUES (%s, 'p000000000000000', now(), 'deleted') RETURNING id",
        (TARGET,),
    ).fetchone()  # type: ignore[misc]
    conn.execute(PULLS, {"stream": stream, "first": 0, "last": collected // 10})
    for first in range(1, total + 1, CHUNK):
        last = min(first + CHUNK - 1, total)
        started = time.perf_counter()
        conn.execute(
            HISTORY,
            {
                "first": first,
                "last": last,
                "total": total,
                "collected": collected,
                "ispbs": ispbs,
                "n_ispbs": len(ispbs),
            },
        )
        log(f"rows {first:,}..{last:,} in {time.perf_counter() - started:.1f} s")


def load_backlog(conn: psycopg.Connection, start: int, count: int) -> None:
    for first in range(start, start + count, CHUNK):
        last = min(first + CHUNK - 1, start + count - 1)
        conn.execute(
            HISTORY,
            {
                "first": first,
                "last": last,
                "total": start + count,
                "collected": 0,
                "ispbs": [TARGET],
                "n_ispbs": 1,
            },
        )
    log(f"backlog of {count:,} queued rows for {TARGET}")


def analyze(conn: psycopg.Connection) -> None:
    started = time.perf_counter()
    conn.execute("VACUUM (ANALYZE) pix_message")
    conn.execute("VACUUM (ANALYZE) pix_pull")
    log(f"vacuum analyze in {time.perf_counter() - started:.1f} s")


def explain(conn: psycopg.Connection, query: str, limit: int) -> tuple[str, float]:
    """The plan and time of a read's claim (run, then rolled back) for TARGET."""
    (stream_id,) = conn.execute("SELECT min(id) FROM pix_stream").fetchone()  # type: ignore[misc]
    params = {"ispb": TARGET, "pull": PULL, "limit": limit, "stream_id": stream_id,
              "used": PULL, "answer_in": 8.0}  # fmt: skip
    sql = psycopg.ClientCursor(conn).mogrify(query, params)
    with conn.transaction(force_rollback=True):
        lines = [row[0] for row in conn.execute(f"EXPLAIN (ANALYZE, BUFFERS)\n{sql}")]
    text = "\n".join(lines)
    match = re.search(r"Execution Time: ([0-9.]+) ms", text)
    return text, float(match.group(1)) if match else float("nan")


def report(conn: psycopg.Connection, title: str, summary: dict[str, float]) -> None:
    for limit in (10, 1):
        text, ms = explain(conn, QUERIES["confirm_claim_advance"], limit)
        print(f"\n=== {title}: confirm_claim_advance for {TARGET}, LIMIT {limit} ===\n{text}")
        summary[f"{title} limit {limit} ms"] = ms


def run(
    conn: psycopg.Connection,
    total: int,
    queued: int,
    ispbs: list[str],
    backlog: int,
    summary: dict[str, float],
) -> None:
    (version,) = conn.execute("SHOW server_version").fetchone()  # type: ignore[misc]
    print(f"PostgreSQL {version}; {total:,} rows, {len(ispbs)} ISPBs, {queued:,} queued")
    started = time.perf_counter()
    bulk_session(conn)
    load_history(conn, total, queued, ispbs)
    conn.execute("RESET session_replication_role")
    summary["load s"] = round(time.perf_counter() - started, 1)
    analyze(conn)
    (size,) = conn.execute(
        "SELECT pg_size_pretty(pg_total_relation_size('pix_message'))"
    ).fetchone()  # type: ignore[misc]
    print(f"pix_message: {size} with indexes")
    report(conn, "steady state", summary)
    if backlog:
        bulk_session(conn)
        load_backlog(conn, total + 1, backlog)
        conn.execute("RESET session_replication_role")
        analyze(conn)
        report(conn, f"backlog of {backlog:,} for {TARGET}", summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("millions", nargs="?", type=float, default=10)
    parser.add_argument("--ispbs", type=int, default=20)
    parser.add_argument("--queued", type=float, default=0.001, help="share left queued")
    parser.add_argument("--backlog", type=float, default=0.05, help="extra queued, as a share")
    parser.add_argument("--keep", action="store_true", help="do not drop the scratch database")
    args = parser.parse_args()

    total = int(args.millions * 1_000_000)
    queued = int(total * args.queued)
    ispbs = [TARGET] + [f"{10_000_000 + 7919 * i:08d}" for i in range(1, args.ispbs)]
    summary: dict[str, float] = {"rows": total, "queued": queued}
    with (
        server() as (server_url, _),
        scratch_database(server_url, prefix="pixstream_explain", keep=args.keep) as url,
        psycopg.connect(url, autocommit=True) as conn,
    ):
        run(conn, total, queued, ispbs, int(total * args.backlog), summary)
    print(json.dumps({"benchmark": "explain_claim", **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
