"""Reconnect storm: every bank reconnects at once, and the clients are not gentle.

1,000 ISPBs x 6 multipart collectors start within 7 s (as after a deploy, a
host restart or a network blip), on the default gunicorn.conf.py. The
collectors are impatient: an error is retried after about a second, whatever
``Retry-After`` says (``--patient`` honours it instead), and they never give
up; a 503 on a continuation repeats the same URL, as the contract allows.

Pass (the hardening issue): within 30 s after the burst every collector holds
a long poll (the server reports them all waiting), then, during the hold,
every 204 comes on time (window + 1 s, as the client sees it) and pushed
messages arrive with p99 <= 200 ms; no stream is orphaned (open streams in
the database = collectors). The 503s are counted and reported, not limited;
so are the answers that came late during the storm itself.

    python bench/storm.py [--ispbs 1000] [--burst 7] [--hold 20] [--patient]
"""

from gevent import monkey

monkey.patch_all()

import shutil  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402
from gevent.pool import Group  # noqa: E402

import _common as c  # noqa: E402
from capacity import LONG_POLL, NO_ANSWER, NO_METRICS, Load, pusher, waiting_requests  # noqa: E402

TARGET_SETTLE_SECONDS = 30.0
TARGET_PUSH_P99_MS = 200.0


def open_streams(db: c.Database) -> int:
    with psycopg.connect(db.url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pix_stream WHERE close_reason IS NULL").fetchone()
    return int(row[0]) if row else 0


def metric_lines(port: int) -> list[str]:
    """The server's /metrics (all workers), a line each."""
    conn = c.HttpConn("127.0.0.1", port, timeout=10)
    try:
        return conn.request("GET", "/metrics").body.decode(errors="replace").splitlines()
    finally:
        conn.close()


def refused(port: int) -> dict[str, float]:
    """The server's refusal counters (all workers), by reason."""
    counts = {}
    for line in metric_lines(port):
        if line.startswith("pixstream_requests_refused_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = float(line.split()[-1])
        elif line.startswith("pixstream_wakeup_claim_failures_total "):
            counts["wakeup_claim_failures"] = float(line.split()[-1])
    return counts


def pool_gauges(port: int) -> dict[str, float]:
    """The pool's gauges (all workers) and how many reads ran, from /metrics."""
    wanted = ("pixstream_pool_", "pixstream_claim_duration_seconds_count", "pixstream_waiting_")
    return {
        line.split()[0]: float(line.split()[-1])
        for line in metric_lines(port)
        if line.startswith(wanted)
    }


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--ispbs", type=int, default=1000)
    args.add_argument("--per-ispb", type=int, default=6)
    args.add_argument("--burst", type=float, default=7, help="seconds over which all start")
    args.add_argument("--hold", type=float, default=20, help="seconds of pushes once settled")
    args.add_argument("--push-rate", type=float, default=10, help="pushed messages per second")
    args.add_argument("--patient", action="store_true", help="honour Retry-After")
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--time-limit", type=float, default=300)
    args.add_argument("--keep-log", help="copy gunicorn's log here")
    opts = args.parse_args()
    c.start_watchdog(opts.time_limit, "storm")
    polls = opts.ispbs * opts.per_ispb
    if c.raise_nofile() < polls + 100:
        raise SystemExit(f"the open-file limit is too low for {polls} connections")
    with c.database() as db:
        server = c.Gunicorn(db.url, workers=opts.workers)
        postmaster = c.postmaster_pid(db.url)
        try:
            result = run(server, postmaster, db, opts)
        finally:
            if opts.keep_log:
                shutil.copy(server.log.name, opts.keep_log)
            server.stop()
    hold = result["hold"]
    met = (
        result["settle_seconds_after_burst"] is not None
        and result["settle_seconds_after_burst"] <= TARGET_SETTLE_SECONDS
        and hold["late_204"] == 0
        and result["orphan_streams"] == 0
        and hold["push_p99_ms"] is not None
        and hold["push_p99_ms"] <= TARGET_PUSH_P99_MS
        and hold["pushes_undelivered"] == 0
        and hold["errors"] == 0
    )
    c.emit(
        {
            "bench": "storm",
            "database": db.kind,
            "workers": server.workers,
            "collectors": polls,
            "clients": "patient (Retry-After)" if opts.patient else "impatient (~1 s, no give-up)",
            **result,
            "targets": {
                "settle_seconds_after_burst": TARGET_SETTLE_SECONDS,
                "push_p99_ms": TARGET_PUSH_P99_MS,
                "hold_late_204": 0,
                "orphan_streams": 0,
            },
            "met": met,
        }
    )


def run(server: c.Gunicorn, postmaster: int | None, db: c.Database, opts) -> dict:
    port = server.port
    load = Load(port, impatient=not opts.patient)
    taken: set[str] = set()
    ispbs = [c.random_ispb(taken) for _ in range(opts.ispbs)]
    polls = opts.ispbs * opts.per_ispb
    group = Group()
    quiet = c.wait_quiet()
    c.log(f"storm: {polls} collectors within {opts.burst:.0f} s")
    meter = c.CpuMeter(server, postmaster).start()
    started = time.perf_counter()
    order = [ispb for _ in range(opts.per_ispb) for ispb in ispbs]
    for i, ispb in enumerate(order):
        delay = started + i * opts.burst / polls - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        group.spawn(load.collector, ispb)
    burst_end = time.perf_counter()

    # Settled: the server reports every collector waiting.
    settled_at = None
    waiting = NO_ANSWER
    while time.perf_counter() < burst_end + 60:
        waiting = waiting_requests(port)
        if waiting == NO_METRICS:
            raise SystemExit("the server has no pixstream_waiting_requests metric")
        if waiting >= polls:
            settled_at = time.perf_counter()
            break
        gevent.sleep(0.25)
    storm_cpu = meter.stop()
    gauges = pool_gauges(port)
    storm_answers = dict(load.statuses)
    c.log(f"storm: {waiting} waiting, settled={settled_at is not None}; holding {opts.hold:.0f} s")

    # Hold: pushes to collectors that are all waiting.
    hold_meter = c.CpuMeter(server, postmaster).start()
    load.hold_started = time.perf_counter()
    until = load.hold_started + opts.hold
    push_job = gevent.spawn(pusher, port, ispbs, opts.push_rate, until - 1.0, load)
    waiting_min = polls
    while time.perf_counter() < until:
        gevent.sleep(1)
        sample = waiting_requests(port)
        if sample >= 0:
            waiting_min = min(waiting_min, sample)
    posted = push_job.get(timeout=30)
    gevent.sleep(0.5)  # the last push's delivery
    hold_cpu = hold_meter.stop()
    streams_open = open_streams(db)
    counters = refused(port)
    load.stopping = True
    group.kill(block=True, timeout=10)

    latencies = [
        max(0.0, load.arrived[ispb] - returned)
        for ispb, returned in posted.items()
        if ispb in load.arrived
    ]
    late = [d for d in load.durations_204 if d > LONG_POLL + 1]
    hold_errors = sum(n for k, n in load.hold_statuses.items() if k not in ("200", "204"))
    return {
        "machine_busy_before": quiet,
        "burst_seconds": round(burst_end - started, 1),
        "settle_seconds_after_burst": (
            None if settled_at is None else round(settled_at - burst_end, 1)
        ),
        "waiting_when_settled": waiting,
        "storm_answers": storm_answers,
        "answers_503": load.statuses.get("503", 0),
        "answers_429": load.statuses.get("429", 0),
        "problems": load.problems,
        "server_refusals": counters,
        "orphan_streams": max(0, streams_open - polls),
        "streams_open": streams_open,
        "late_204": len(late),
        "poll_204_max_s": round(max(load.durations_204, default=0), 3),
        "storm_cpu": storm_cpu,
        "pool_at_settle": gauges,
        "hold": {
            "seconds": opts.hold,
            "waiting_min": waiting_min,
            "answers": load.hold_statuses,
            "errors": hold_errors,
            "late_204": sum(1 for d in load.hold_durations_204 if d > LONG_POLL + 1),
            "poll_204_max_s": round(max(load.hold_durations_204, default=0), 3),
            "pushes": len(posted),
            "pushes_undelivered": len(posted) - len(latencies),
            "push_p50_ms": c.ms(c.percentile(latencies, 50)),
            "push_p99_ms": c.ms(c.percentile(latencies, 99)),
            "push_max_ms": c.ms(max(latencies, default=None)),
            **hold_cpu,
        },
        "client_errors": load.errors[:5],
        "server_errors": server.error_lines()[:5],
    }


if __name__ == "__main__":
    main()
