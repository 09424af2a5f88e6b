"""Capacity: one instance (default gunicorn.conf.py) holding 6,000 concurrent long polls.

1,000 ISPBs x 6 multipart collectors (6 is the per-ISPB stream limit) open
their streams, ramped up in parallel, and keep following Pull-Next. Once the
server reports them all waiting (``pixstream_waiting_requests`` on /metrics, or
a fixed delay without it), the hold phase starts: messages are pushed (``POST
/api/util/msgs/{ispb}/1``, each time to an ISPB not pushed before) and timed
from the POST's return to a collector holding them, while the resident memory
of the gunicorn master and workers is sampled from /proc. Every 204 must come
within the long-poll window + 1 s.

    python bench/capacity.py [--ispbs 1000] [--hold 40] [--push-rate 10]
"""

from gevent import monkey

monkey.patch_all()

import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402
from gevent.pool import Group  # noqa: E402

import _common as c  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
LONG_POLL = 8.0
TARGET_POLLS = 6000
TARGET_PUSH_P99_MS = 50.0
TARGET_RSS_MB = 500.0


class Load:
    """Every collector's answers, aggregated; push arrivals by ISPB."""

    def __init__(self, port: int, *, impatient: bool = False) -> None:
        self.port = port
        # Impatient clients retry an error after about a second, whatever
        # Retry-After says (bench/storm.py); the others honour it.
        self.impatient = impatient
        self.last_error_at: float | None = None
        self.stopping = False
        self.hold_started: float | None = None
        self.statuses: dict[str, int] = {}
        self.hold_statuses: dict[str, int] = {}
        self.durations_204: list[float] = []
        self.hold_durations_204: list[float] = []
        self.first_answer: list[float] = []  # start sent -> its first answer
        self.arrived: dict[str, float] = {}
        self.delivered_messages = 0
        self.errors: list[str] = []
        self.connected = 0
        self.push_failures: list[str] = []
        self.error_kinds: set[str] = set()
        self.problems: dict[str, int] = {}  # error answers by status and detail

    def _count(self, key: str, sent: float) -> None:
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if self.hold_started is not None and sent >= self.hold_started:
            self.hold_statuses[key] = self.hold_statuses.get(key, 0) + 1

    def collector(self, ispb: str) -> None:
        conn = c.HttpConn("127.0.0.1", self.port, timeout=LONG_POLL + 60)
        path = f"/api/pix/{ispb}/stream/start"
        first = True
        try:
            conn.connect()
            self.connected += 1
            while not self.stopping:
                sent = time.perf_counter()
                try:
                    conn.send("GET", path, ACCEPT)
                    reply = conn.receive()
                except ConnectionError:
                    # The server closed this keep-alive connection meanwhile (after a
                    # Retry-After pause, say): the same request again, on a new one.
                    conn.close()
                    sent = time.perf_counter()
                    conn.send("GET", path, ACCEPT)
                    reply = conn.receive()
                now = time.perf_counter()
                if first:
                    self.first_answer.append(now - sent)
                    first = False
                self._count(str(reply.status), sent)
                if reply.status == 204:
                    self.durations_204.append(now - sent)
                    if self.hold_started is not None and sent >= self.hold_started:
                        self.hold_durations_204.append(now - sent)
                elif reply.status == 200:
                    batch = reply.json()
                    self.delivered_messages += len(batch)
                    self.arrived.setdefault(ispb, now)
                else:
                    if len(self.errors) < 20 and str(reply.status) not in self.error_kinds:
                        self.errors.append(f"{reply.status} {reply.body[:160]!r}")
                    self.error_kinds.add(str(reply.status))
                    try:
                        detail = f"{reply.status} {reply.json().get('detail', '')}"[:90]
                    except ValueError:
                        detail = f"{reply.status} (no problem document)"
                    self.problems[detail] = self.problems.get(detail, 0) + 1
                    self.last_error_at = now
                    # 503: the same request is safe to repeat, after Retry-After.
                    if self.impatient:
                        gevent.sleep(random.uniform(0.8, 1.2))
                    else:
                        gevent.sleep(float(reply.headers.get("retry-after", 1)))
                    continue
                path = reply.pull_next or path
        except gevent.GreenletExit:
            pass
        except Exception as exc:
            if not self.stopping:
                self._count("client_error", time.perf_counter())
                if len(self.errors) < 20:
                    self.errors.append(f"collector stopped: {exc!r}")
        finally:
            conn.close()


NO_METRICS = -1
NO_ANSWER = -2


def waiting_requests(port: int) -> int:
    """The server's own count of reads waiting (all workers), from /metrics.

    NO_METRICS when the server has no such metric, NO_ANSWER when it did not answer in time.
    """
    try:
        conn = c.HttpConn("127.0.0.1", port, timeout=10)
        reply = conn.request("GET", "/metrics")
        conn.close()
    except OSError:
        return NO_ANSWER
    if reply.status != 200:
        return NO_METRICS
    for line in reply.body.decode(errors="replace").splitlines():
        if line.startswith("pixstream_waiting_requests") and not line.startswith("#"):
            return int(float(line.split()[-1]))
    return NO_METRICS


def pusher(port: int, ispbs: list[str], rate: float, until: float, load: Load) -> dict:
    """POST one message to a fresh ISPB every 1/rate s; the POSTs' return times."""
    conn = c.HttpConn("127.0.0.1", port, timeout=30)
    posted: dict[str, float] = {}
    order = list(ispbs)
    random.shuffle(order)
    next_at = time.perf_counter()
    for ispb in order:
        if time.perf_counter() >= until:
            break
        gevent.sleep(max(0.0, next_at - time.perf_counter()))
        next_at += 1 / rate
        try:
            c.post_messages(conn, ispb, 1)
        except (RuntimeError, OSError) as exc:
            load.push_failures.append(str(exc)[:200])
            continue
        posted[ispb] = time.perf_counter()
    conn.close()
    return posted


def sessions(db: c.Database) -> int:
    """pg_stat_database.sessions of the bench database (connections ever opened to it)."""
    with psycopg.connect(db.admin_url or db.url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", (db.name,)
        ).fetchone()
    return int(row[0]) if row else 0


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--ispbs", type=int, default=1000)
    args.add_argument("--per-ispb", type=int, default=6)
    args.add_argument("--ramp-rate", type=float, default=500, help="new collectors per second")
    args.add_argument("--hold", type=float, default=40, help="seconds of measurement")
    args.add_argument("--push-rate", type=float, default=10, help="pushed messages per second")
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--time-limit", type=float, default=420)
    opts = args.parse_args()
    c.start_watchdog(opts.time_limit, "capacity")
    nofile = c.raise_nofile()
    polls = opts.ispbs * opts.per_ispb
    if nofile < polls + 100:
        raise SystemExit(f"open-file limit {nofile} is too low for {polls} connections")
    load_before = c.loadavg()
    with c.database() as db:
        server = c.Gunicorn(db.url, workers=opts.workers)
        postmaster = c.postmaster_pid(db.url)
        sessions0 = sessions(db)
        try:
            result = run(server, postmaster, opts)
        finally:
            server.stop()
        # Connections the server opened while loaded (pool growth, or churn: a pool
        # that discards connections under load reconnects again and again).
        result["db_connections_opened"] = sessions(db) - sessions0
    hold = result["hold"]
    met = (
        result["collectors_connected"] >= polls
        and isinstance(result["waiting_at_hold_start"], int)
        and result["waiting_at_hold_start"] >= polls * 0.99
        and result["late_204"] == 0
        and result["bad_answers"] == 0
        and hold["push_p99_ms"] is not None
        and hold["push_p99_ms"] <= TARGET_PUSH_P99_MS
        and hold["pushes_undelivered"] == 0
        and hold["push_failures"] == 0
        and result["rss_max_mb"] <= TARGET_RSS_MB
    )
    c.emit(
        {
            "bench": "capacity",
            "database": db.kind,
            "workers": server.workers,
            "long_polls": polls,
            "long_poll_seconds": LONG_POLL,
            **result,
            "targets": {
                "long_polls": TARGET_POLLS,
                "late_204": 0,
                "push_p99_ms": TARGET_PUSH_P99_MS,
                "rss_max_mb": TARGET_RSS_MB,
            },
            "met": met,
            "loadavg_1m_before": load_before,
        }
    )


def run(server: c.Gunicorn, postmaster: int | None, opts) -> dict:
    port = server.port
    load = Load(port)
    taken: set[str] = set()
    ispbs = [c.random_ispb(taken) for _ in range(opts.ispbs)]
    polls = opts.ispbs * opts.per_ispb
    group = Group()
    rss_samples: list[tuple[float, int]] = []

    def sample_rss() -> None:
        while not load.stopping:
            rss_samples.append((time.perf_counter(), server.rss_bytes()))
            gevent.sleep(1)

    sampler = gevent.spawn(sample_rss)
    rss_idle = server.rss_bytes()

    quiet = c.wait_quiet()
    # Ramp up: collectors of all ISPBs interleaved, at a steady rate.
    c.log(f"capacity: ramping up {polls} collectors at {opts.ramp_rate:.0f}/s")
    ramp_meter = c.CpuMeter(server, postmaster).start()
    ramp_started = time.perf_counter()
    order = [ispb for _ in range(opts.per_ispb) for ispb in ispbs]
    for i, ispb in enumerate(order):
        due = ramp_started + i / opts.ramp_rate
        delay = due - time.perf_counter()
        if delay > 0:
            gevent.sleep(delay)
        group.spawn(load.collector, ispb)
    ramp_sent = time.perf_counter() - ramp_started

    # Wait for the server to report every collector waiting (or give it a fixed delay).
    waiting = NO_ANSWER
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        waiting = waiting_requests(port)
        if waiting == NO_METRICS:
            gevent.sleep(10)
            break
        if waiting >= polls * 0.99:
            break
        gevent.sleep(0.5)
    ramp_seconds = time.perf_counter() - ramp_started
    ramp_cpu = ramp_meter.stop()
    c.log(f"capacity: {waiting} waiting after {ramp_seconds:.1f} s; holding {opts.hold:.0f} s")

    # Hold: pushes, memory, answers' timing.
    hold_meter = c.CpuMeter(server, postmaster).start()
    load.hold_started = time.perf_counter()
    until = load.hold_started + opts.hold
    push_job = gevent.spawn(pusher, port, ispbs, opts.push_rate, until - 1.0, load)
    waiting_samples = []
    while time.perf_counter() < until:
        gevent.sleep(2)
        sample = waiting_requests(port)
        waiting_samples.append(None if sample < 0 else sample)
    posted = push_job.get(timeout=30)
    gevent.sleep(0.5)  # the last push's delivery
    hold_cpu = hold_meter.stop()
    load.stopping = True
    sampler.join(timeout=3)
    rss_end = server.rss_bytes()
    pss_end = server.pss_bytes()
    group.kill(block=True, timeout=10)
    statuses = server.status_counts()
    errors = server.error_lines()

    latencies = []
    early = 0
    for ispb, returned in posted.items():
        if ispb in load.arrived:
            early += load.arrived[ispb] < returned
            latencies.append(max(0.0, load.arrived[ispb] - returned))
    late = [d for d in load.durations_204 if d > LONG_POLL + 1]
    bad = sum(n for k, n in load.statuses.items() if k not in ("200", "204"))
    rss_max = max([b for _, b in rss_samples] + [rss_end])
    hold_requests = sum(load.hold_statuses.values())
    return {
        "machine_busy_before": quiet,
        "collectors_connected": load.connected,
        "ramp_send_seconds": round(ramp_sent, 1),
        "ramp_seconds_until_all_waiting": round(ramp_seconds, 1),
        "waiting_at_hold_start": {NO_METRICS: "no metric", NO_ANSWER: "no answer"}.get(
            waiting, waiting
        ),
        "metrics_scrapes_unanswered": sum(1 for w in waiting_samples if w is None),
        "waiting_during_hold_min": min((w for w in waiting_samples if w is not None), default=None),
        "first_answer_p50_s": round(c.percentile(load.first_answer, 50) or 0, 3),
        "first_answer_max_s": round(max(load.first_answer, default=0), 3),
        "answers": load.statuses,
        "bad_answers": bad,
        "late_204": len(late),
        "poll_204_p50_s": round(c.percentile(load.durations_204, 50) or 0, 3),
        "poll_204_p99_s": round(c.percentile(load.durations_204, 99) or 0, 3),
        "poll_204_max_s": round(max(load.durations_204, default=0), 3),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_max_mb": round(rss_max / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "pss_end_mb": round(pss_end / 2**20, 1),
        "processes": len(server.pids()),
        "hold": {
            "seconds": opts.hold,
            "requests": hold_requests,
            "requests_per_s": round(hold_requests / opts.hold, 1),
            "answers": load.hold_statuses,
            "poll_204_max_s": round(max(load.hold_durations_204, default=0), 3),
            "pushes": len(posted),
            "pushes_undelivered": len(posted) - len(latencies),
            "push_failures": len(load.push_failures),
            "push_failure_examples": load.push_failures[:3],
            "push_p50_ms": c.ms(c.percentile(latencies, 50)),
            "push_p90_ms": c.ms(c.percentile(latencies, 90)),
            "push_p99_ms": c.ms(c.percentile(latencies, 99)),
            "push_max_ms": c.ms(max(latencies, default=None)),
            "arrived_before_post_returned": early,
            **hold_cpu,
        },
        "ramp_cpu": ramp_cpu,
        "client_cpu_share": hold_cpu["client_cpu_share"],
        "server_statuses": statuses,
        "client_errors": load.errors[:5],
        "server_errors": errors[:5],
    }


if __name__ == "__main__":
    main()
