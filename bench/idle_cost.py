"""Idle cost: what 300 long polls on empty ISPBs cost the database while they wait.

50 empty ISPBs x 6 collectors each open a stream and follow it through ten
long-poll windows (8 s; ``--windows``): start -> 204, Pull-Next -> 204, ...
Ten windows show the steady state: an idle stream claims in the database once
in five polls (PIXSTREAM_IDLE_CLAIM_EVERY), and the last-seen times the other
polls owe are written in batches, at most every 5 s per worker.

Transactions are counted with pg_stat_database (xact_commit + xact_rollback).
Backends publish those counters lazily (up to ~10 s late), but always when they
exit, so each phase brackets a whole gunicorn lifetime: read, start gunicorn,
warm up, run, stop gunicorn (its backends exit), read. The measured phase has
the collectors; the baseline phase is the same without them, over as long (the
listeners' probes and the periodic sweeper run regardless). Connection
start-ups count as one transaction each in PostgreSQL; they are reported and
taken out using pg_stat_database.sessions. Meanwhile pg_stat_activity is sampled
every 100 ms to show which statements start while the collectors wait (only the
sweeper's should) and how many pooled connections are in use.

    python bench/idle_cost.py [--ispbs 50] [--per-ispb 6] [--windows 10]
"""

from gevent import monkey

monkey.patch_all()

import re  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402

import _common as c  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
LONG_POLL = 8.0
WINDOWS = 10  # default of --windows
TARGET_PER_POLL_WINDOW = 0.25


def _statement_names() -> list[tuple[str, str]]:
    """Each named statement as pg_stat_activity shows it: psycopg's $n placeholders."""
    try:
        from pixstream.sql import QUERIES
    except ImportError:  # pragma: no cover - the bench runs in the project's venv
        return []
    rendered = []
    for name, text in QUERIES.items():
        numbers: dict[str, int] = {}

        def number(match: re.Match[str], numbers: dict[str, int] = numbers) -> str:
            return f"${numbers.setdefault(match.group(1), len(numbers) + 1)}"

        rendered.append((name, re.sub(r"%\((\w+)\)s", number, text.strip()).replace("%%", "%")))
    return rendered


class Monitor:
    """Reads the counters of the bench database, from another database when it can."""

    def __init__(self, db: c.Database) -> None:
        self.dbname = db.name
        self.same_db = db.admin_url is None
        self.url = db.url if self.same_db else db.admin_url
        self.conn = psycopg.connect(self.url, autocommit=True)
        self.names = _statement_names()
        self.backends = c.BackendCpu(db)

    def counters(self) -> tuple[int, int]:
        """(transactions, sessions) of the database, once its app backends have all exited."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.activity(everything=True):
            time.sleep(0.1)
        # A fresh connection: in the measured database, its own start-up and query add
        # one session and two transactions, and it has flushed them once it has closed.
        with psycopg.connect(self.url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT xact_commit + xact_rollback, sessions FROM pg_stat_database "
                "WHERE datname = %s",
                (self.dbname,),
            ).fetchone()
        assert row is not None
        xacts, sessions = int(row[0]), int(row[1])
        return (xacts - 2, sessions - 1) if self.same_db else (xacts, sessions)

    def activity(self, everything: bool = False) -> list[tuple]:
        """(pid, state, query, query_start epoch) of the app's backends, listeners excluded."""
        rows = self.conn.execute(
            "SELECT pid, state, query, extract(epoch FROM query_start) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
            (self.dbname,),
        ).fetchall()
        if everything:
            return rows
        # The listeners run LISTEN, then probe with a bare "SELECT 1" (the pool's ping
        # has a semicolon).
        return [r for r in rows if r[2] not in ("LISTEN pix_inserted", "SELECT 1")]

    def name(self, query: str) -> str:
        """The statement's name; pg_stat_activity cuts long texts (track_activity_query_size)."""
        query = query.strip()
        for name, text in self.names:
            if text == query or (len(query) >= 900 and text.startswith(query)):
                return name
        return " ".join(query.split())[:60]

    def close(self) -> None:
        self.backends.close()
        self.conn.close()


def collector(port: int, ispb: str, record: dict, windows: int) -> None:
    """Start a stream, follow it through ``windows`` long polls; keep each answer's timing."""
    conn = c.HttpConn("127.0.0.1", port, timeout=LONG_POLL + 30)
    path = f"/api/pix/{ispb}/stream/start"
    record["polls"] = []
    try:
        for _ in range(windows):
            conn.send("GET", path, ACCEPT)
            sent = time.time()
            reply = conn.receive()
            record["polls"].append((sent, time.time(), reply.status))
            if reply.status != 204:
                record["bad"] = f"{reply.status} {reply.body[:160]!r}"
            path = reply.pull_next or path
        record["last"] = path
    except Exception as exc:
        record["error"] = repr(exc)
    finally:
        conn.close()


def close_streams(db: c.Database) -> int:
    """Close every stream left open, in SQL, between the phases: no server is up to
    count it (a DELETE would cost a transaction, plus one per listening process for
    its notification); the baseline's sweeper then has nothing to expire."""
    with psycopg.connect(db.url, autocommit=True) as conn:
        closed = conn.execute(
            "UPDATE pix_stream SET closed_at = now(), close_reason = 'deleted'"
            " WHERE closed_at IS NULL"
        ).rowcount
    return closed


def warm_up(server: c.Gunicorn) -> None:
    """Touch every worker's pool, listener and code paths, away from the measured ISPBs."""
    warm = c.HttpConn("127.0.0.1", server.port)
    warm_ispb = c.random_ispb()
    for _ in range(server.workers * 6):
        c.post_messages(warm, warm_ispb, 1)
        fresh = c.HttpConn("127.0.0.1", server.port)
        reply = fresh.request("GET", f"/api/pix/{warm_ispb}/stream/start")
        fresh.request("DELETE", reply.pull_next or "")
        fresh.close()
    warm.close()


def phase(db: c.Database, monitor: Monitor, workers: int | None, run) -> dict:
    """One gunicorn lifetime: counters before, start, warm up, ``run(server)``, stop, counters."""
    quiet = c.wait_quiet()
    xacts0, sessions0 = monitor.counters()
    server = c.Gunicorn(db.url, workers=workers)
    try:
        warm_up(server)
        started = time.monotonic()
        result = run(server)
        result["seconds"] = time.monotonic() - started
        result["server_errors"] = server.error_lines()[:5]
        result["workers"] = server.workers
        result["machine_busy_before"] = quiet
    finally:
        server.stop()
    xacts1, sessions1 = monitor.counters()
    result["transactions"] = xacts1 - xacts0
    result["sessions"] = sessions1 - sessions0
    return result


def idle(seconds: float) -> dict:
    gevent.sleep(seconds)
    return {}


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--ispbs", type=int, default=50)
    args.add_argument("--per-ispb", type=int, default=6)
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--windows", type=int, default=WINDOWS)
    args.add_argument("--time-limit", type=float, default=600)
    opts = args.parse_args()
    c.start_watchdog(opts.time_limit, "idle_cost")
    c.raise_nofile()
    load_before = c.loadavg()
    with c.database() as db:
        monitor = Monitor(db)
        try:
            c.log(f"idle_cost: {opts.ispbs * opts.per_ispb} long polls")

            def run(server: c.Gunicorn) -> dict:
                return collect(server, monitor, opts.ispbs, opts.per_ispb, opts.windows)

            measured = phase(db, monitor, opts.workers, run)
            measured["streams_closed_between_phases"] = close_streams(db)
            c.log(f"idle_cost: baseline over {measured['seconds']:.1f} s")
            baseline = phase(db, monitor, opts.workers, lambda s: idle(measured["seconds"]))
        finally:
            monitor.close()
    polls = opts.ispbs * opts.per_ispb
    # Scale the baseline to the measured phase's length (they differ by a fraction of a second).
    scale = measured["seconds"] / baseline["seconds"]
    attributed = measured["transactions"] - baseline["transactions"] * scale
    new_sessions = measured["sessions"] - baseline["sessions"]
    per = (attributed - new_sessions) / (polls * opts.windows)
    met = (
        per <= TARGET_PER_POLL_WINDOW
        and measured["queries_started_while_waiting_excluding_sweeper"] == 0
        and measured["all_answered_204_on_time"]
    )
    c.emit(
        {
            "bench": "idle_cost",
            "database": db.kind,
            "monitor_in_other_database": not monitor.same_db,
            "workers": measured["workers"],
            "long_polls": polls,
            "windows": opts.windows,
            "long_poll_seconds": LONG_POLL,
            "transactions_per_poll_per_window": round(per, 3),
            "transactions_per_poll_per_window_incl_connects": round(
                attributed / (polls * opts.windows), 3
            ),
            "transactions_attributed": round(attributed, 1),
            "connections_opened_for_the_load": new_sessions,
            "measured_phase": {k: v for k, v in measured.items() if k not in ("workers",)},
            "baseline_phase": {
                "seconds": round(baseline["seconds"], 2),
                "transactions": baseline["transactions"],
                "sessions": baseline["sessions"],
            },
            "target_per_poll_per_window": TARGET_PER_POLL_WINDOW,
            "met": met,
            "loadavg_1m_before": load_before,
        }
    )


def collect(server: c.Gunicorn, monitor: Monitor, ispbs: int, per_ispb: int, windows: int) -> dict:
    """Run the collectors; sample pg_stat_activity meanwhile."""
    port = server.port
    taken: set[str] = set()
    records = [{"ispb": c.random_ispb(taken)} for _ in range(ispbs)]
    records = [dict(r) for r in records for _ in range(per_ispb)]
    samples: list[tuple[float, list[tuple]]] = []
    meter = c.CpuMeter(server, backends=monitor.backends).start()
    jobs = [gevent.spawn(collector, port, r["ispb"], r, windows) for r in records]
    while not all(job.ready() for job in jobs):
        samples.append((time.time(), monitor.activity()))
        gevent.sleep(0.1)
    cpu = meter.stop()

    errors = [r["error"] for r in records if "error" in r]
    errors += sorted({r["bad"] for r in records if "bad" in r})
    polls = [p for r in records for p in r.get("polls", [])]
    statuses: dict[int, int] = {}
    for _, _, status in polls:
        statuses[status] = statuses.get(status, 0) + 1
    durations = [answered - sent for sent, answered, status in polls if status == 204]
    on_time = all(LONG_POLL - 0.05 <= d <= LONG_POLL + 1 for d in durations)

    # While waiting: from 1 s after the last request of a window was sent until
    # 0.2 s before the first answer of that window (the end-of-window re-check).
    intervals = []
    for window in range(windows):
        sent = [r["polls"][window][0] for r in records if len(r.get("polls", [])) > window]
        answered = [r["polls"][window][1] for r in records if len(r.get("polls", [])) > window]
        if sent and answered:
            intervals.append((max(sent) + 1.0, min(answered) - 0.2))
    waiting_seconds = sum(max(0.0, b - a) for a, b in intervals)

    def waiting(t: float) -> bool:
        return any(a <= t <= b for a, b in intervals)

    started: dict[tuple[int, float], str] = {}
    in_use_while_waiting = 0
    connections = 0
    for at, rows in samples:
        connections = max(connections, len(rows))
        if waiting(at):
            in_use = [r for r in rows if r[1] in ("active", "idle in transaction")]
            in_use_while_waiting = max(in_use_while_waiting, len(in_use))
        for pid, _, query, query_start in rows:
            if query_start is not None and waiting(float(query_start)):
                started[(pid, float(query_start))] = monitor.name(query)
    by_name: dict[str, int] = {}
    for name in started.values():
        by_name[name] = by_name.get(name, 0) + 1
    # The sweeper's transaction: expire_all_idle_streams, count_all_open_streams,
    # COMMIT; and the batched write of the last-seen times idle polls owe.
    sweeper = ("expire_all_idle_streams", "count_all_open_streams", "COMMIT", "touch_quiet_streams")
    not_sweeper = sum(n for name, n in by_name.items() if name not in sweeper)
    return {
        "waiting_seconds_observed": round(waiting_seconds, 2),
        "queries_started_while_waiting": by_name,
        "queries_started_while_waiting_excluding_sweeper": not_sweeper,
        "pool_connections_in_use_while_waiting_max": in_use_while_waiting,
        "pool_connections_open_max": connections,
        "statuses": statuses,
        "all_answered_204_on_time": on_time and not errors and statuses.get(204) == len(polls),
        "poll_seconds_min": round(min(durations), 3) if durations else None,
        "poll_seconds_max": round(max(durations), 3) if durations else None,
        "client_errors": errors[:5],
        "client_cpu_share": cpu["client_cpu_share"],
        "gunicorn_cpu_share": cpu.get("gunicorn_cpu_share"),
        # What one long poll (request -> 204) costs: the load 6,000 of them put on 2 cores.
        "gunicorn_cpu_ms_per_poll": round(1000 * cpu["gunicorn_cpu_s"] / max(1, len(polls)), 3),
        "db_cpu_ms_per_poll": round(1000 * cpu["db_backends_cpu_s"] / max(1, len(polls)), 3),
        "server_statuses": server.status_counts(),
    }


if __name__ == "__main__":
    main()
