"""Churn: the service at a steady load for 30 minutes, retention turning the history over.

A producer inserts ``--rate`` messages a second (COPY from this process, one
statement every 100 ms, spread at random over 200 ISPBs), as a bank's core
system would. Collectors follow their streams with ``multipart/json``: six on
each of 50 ISPBs, one on each of the other 150. The server runs the default
``gunicorn.conf.py`` with ``PIXSTREAM_RETENTION_HOURS`` set to ``--retention``
minutes, so the whole lifecycle (insert, claim, confirm, removal) turns over
several times.

Every minute: the claim duration p50/p99 (from the service's own histogram,
interpolated within its buckets), the push latency p50/p99 (the producer's
commit to a collector holding the message), the drain lag (age of the
oldest queued message), the size of every table and index, dead tuples and
autovacuum runs. At the end, the producer's ledger against the collectors':
every message received, and how many more than once.

Pass: the last 5 minutes' claim p99 and push p99 (the worst minute of each
window) within 20 % of minutes 2 to 6' (the first warms up), the tables'
and indexes' total size stops growing once retention has run for 5 minutes
(at most 10 % more at the end), nothing lost.

    python bench/churn.py [--minutes 30] [--rate 3000] [--retention 5]

Needs autovacuum on (PostgreSQL's default; a development server may have it
off): the retention deletes rows, vacuum makes their space reusable.
"""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import psycopg  # noqa: E402

import _common as c  # noqa: E402
from pixstream import store  # noqa: E402
from pixstream.generator import MessageFactory  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
BUSY_ISPBS, QUIET_ISPBS = 50, 150
TICK = 0.1  # seconds between the producer's statements
TOLERANCE = 1.2  # last 5 minutes within 20 % of the first 5
SIZE_GROWTH = 1.1
TABLES = ("pix_message", "pix_pull", "pix_stream")


class Ledger:
    """What was produced (commit time) and received (first arrival, repeats)."""

    def __init__(self) -> None:
        self.committed: dict[str, float] = {}
        self.received: dict[str, float] = {}
        self.repeats = 0
        self.latencies: list[tuple[float, float]] = []  # (arrival, seconds since commit)
        self.errors: dict[str, int] = {}

    def arrive(self, e2e: str, at: float) -> None:
        if e2e in self.received:
            self.repeats += 1
            return
        self.received[e2e] = at
        committed = self.committed.get(e2e)
        if committed is not None:
            self.latencies.append((at, at - committed))


def producer(db: c.Database, ispbs: list[str], rate: float, until: float, ledger: Ledger) -> None:
    factory = MessageFactory()
    per_tick = rate * TICK
    owed = 0.0
    next_at = time.time()
    with psycopg.connect(db.url, autocommit=True) as conn:
        while time.time() < until:
            gevent.sleep(max(0.0, next_at - time.time()))
            next_at += TICK
            owed += per_tick
            count, owed = int(owed), owed - int(owed)
            counts: dict[str, int] = {}
            for _ in range(count):
                ispb = random.choice(ispbs)
                counts[ispb] = counts.get(ispb, 0) + 1
            rows = [row for ispb, n in counts.items() for row in factory.rows(ispb, n)]
            with conn.transaction():
                store.copy_messages(conn, rows)
            now = time.time()
            for row in rows:
                ledger.committed[str(row[0])] = now


def collector(port: int, ispb: str, ledger: Ledger, stop: gevent.event.Event) -> None:
    conn = c.HttpConn("127.0.0.1", port, timeout=60)
    path = f"/api/pix/{ispb}/stream/start"
    while not stop.is_set():
        try:
            conn.send("GET", path, ACCEPT)
            reply = conn.receive()
        except OSError as exc:
            conn.close()
            ledger.errors[type(exc).__name__] = ledger.errors.get(type(exc).__name__, 0) + 1
            gevent.sleep(0.5)
            continue
        if reply.status == 200:
            now = time.time()
            for doc in reply.json():
                ledger.arrive(doc["endToEndId"], now)
        elif reply.status != 204:
            key = str(reply.status)
            ledger.errors[key] = ledger.errors.get(key, 0) + 1
            gevent.sleep(float(reply.headers.get("retry-after", 1)))
            if reply.status in (404, 410):
                path = f"/api/pix/{ispb}/stream/start"
            continue
        path = reply.pull_next or path
    with contextlib.suppress(OSError):
        conn.request("DELETE", path)
    conn.close()


def claim_histogram(port: int) -> dict[float, float]:
    """Cumulative counts of pixstream_claim_duration_seconds by upper bound."""
    conn = c.HttpConn("127.0.0.1", port, timeout=10)
    body = conn.request("GET", "/metrics").body.decode()
    conn.close()
    buckets = {}
    for line in body.splitlines():
        if line.startswith("pixstream_claim_duration_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return buckets


def quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """histogram_quantile over the difference of two scrapes (linear within a bucket)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1)
        lower, below = bound, cumulative
    return lower


def database_sample(db: c.Database) -> dict:
    with psycopg.connect(db.url, autocommit=True) as conn:
        (lag,) = conn.execute(
            "SELECT extract(epoch FROM now() - min(inserted_at)) FROM pix_message"
            " WHERE pull_id IS NULL"
        ).fetchone()
        sizes = {
            name: int(size)
            for name, size in conn.execute(
                "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')"
                " AND c.relname LIKE 'pix\\_%%'"
            )
        }
        stats = {
            name: (int(live), int(dead), int(vacuums))
            for name, live, dead, vacuums in conn.execute(
                "SELECT relname, n_live_tup, n_dead_tup, autovacuum_count"
                " FROM pg_stat_user_tables WHERE relname = ANY(%s)",
                (list(TABLES),),
            )
        }
    return {"lag_s": round(float(lag or 0.0), 2), "sizes": sizes, "tables": stats}


def window(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(max(values), 2) if values else None


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--minutes", type=float, default=30)
    args.add_argument("--rate", type=float, default=3000, help="messages inserted per second")
    args.add_argument("--retention", type=float, default=5, help="minutes")
    args.add_argument("--workers", type=int, default=None)
    opts = args.parse_args()
    c.start_watchdog(opts.minutes * 60 + 600, "churn")
    c.raise_nofile()
    taken: set[str] = set()
    busy = [c.random_ispb(taken) for _ in range(BUSY_ISPBS)]
    quiet = [c.random_ispb(taken) for _ in range(QUIET_ISPBS)]
    ledger = Ledger()
    minutes: list[dict] = []
    with c.database() as db:
        with psycopg.connect(db.url, autocommit=True) as conn:
            (autovacuum,) = conn.execute("SHOW autovacuum").fetchone()
        if autovacuum != "on":
            c.log("churn: autovacuum is off on this server: dead rows pile up, sizes will grow")
        server = c.Gunicorn(db.url, workers=opts.workers,
                            settings={"RETENTION_HOURS": opts.retention / 60})  # fmt: skip
        try:
            stop = gevent.event.Event()
            collectors = [
                gevent.spawn(collector, server.port, ispb, ledger, stop)
                for ispb in [i for i in busy for _ in range(6)] + quiet
            ]
            started = time.time()
            until = started + opts.minutes * 60
            production = gevent.spawn(producer, db, busy + quiet, opts.rate, until, ledger)
            histogram = claim_histogram(server.port)
            meter = c.CpuMeter(server).start()
            while time.time() < until:
                mark = time.time()
                gevent.sleep(max(0.0, 60 - (time.time() - mark)))
                now = time.time()
                scraped = claim_histogram(server.port)
                recent = sorted(s for at, s in ledger.latencies if now - 60 <= at < now)
                row = {
                    "minute": len(minutes) + 1,
                    "claim_p50_ms": c.ms(quantile(histogram, scraped, 0.5)),
                    "claim_p99_ms": c.ms(quantile(histogram, scraped, 0.99)),
                    "push_p50_ms": c.ms(c.percentile(recent, 50)),
                    "push_p99_ms": c.ms(c.percentile(recent, 99)),
                    "received": len(recent),
                    **database_sample(db),
                }
                row["total_bytes"] = sum(row["sizes"].values())
                histogram = scraped
                minutes.append(row)
                c.log(
                    f"churn: minute {row['minute']}: claim p99 {row['claim_p99_ms']} ms,"
                    f" push p99 {row['push_p99_ms']} ms, lag {row['lag_s']} s,"
                    f" {row['total_bytes'] / 1e6:.1f} MB"
                )
            production.join()
            cpu = meter.stop()
            # Drain what is left, then stop.
            deadline = time.time() + 60
            while time.time() < deadline and len(ledger.received) < len(ledger.committed):
                gevent.sleep(0.5)
            stop.set()
            gevent.joinall(collectors, timeout=30)
            server_errors = server.error_lines()[:5]
        finally:
            server.stop()
    lost = len(set(ledger.committed) - set(ledger.received))
    # The first minute warms up (connections, caches, plans): the baseline is the next five.
    first, last = minutes[1:6], minutes[-5:]
    grown_from = minutes[min(len(minutes) - 1, int(opts.retention) + 5)]["total_bytes"]
    checks = {
        "claim_p99_first5_ms": window(first, "claim_p99_ms"),
        "claim_p99_last5_ms": window(last, "claim_p99_ms"),
        "push_p99_first5_ms": window(first, "push_p99_ms"),
        "push_p99_last5_ms": window(last, "push_p99_ms"),
        "bytes_after_retention": grown_from,
        "bytes_at_end": minutes[-1]["total_bytes"],
        "lost": lost,
        "repeats": ledger.repeats,
    }

    def within(key: str) -> bool:
        a, b = checks[f"{key}_first5_ms"], checks[f"{key}_last5_ms"]
        return a is not None and b is not None and b <= a * TOLERANCE

    met = (
        within("claim_p99")
        and within("push_p99")
        and checks["bytes_at_end"] <= grown_from * SIZE_GROWTH
        and lost == 0
    )
    c.emit(
        {
            "bench": "churn",
            "database": db.kind,
            "minutes": opts.minutes,
            "rate": opts.rate,
            "retention_minutes": opts.retention,
            "autovacuum": autovacuum,
            "collectors": len(busy) * 6 + len(quiet),
            "produced": len(ledger.committed),
            "received": len(ledger.received),
            "client_errors": ledger.errors,
            "server_errors": server_errors,
            "cpu": cpu,
            **checks,
            "met": met,
            "per_minute": minutes,
        }
    )


if __name__ == "__main__":
    main()
