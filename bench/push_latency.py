"""Push latency: from the return of ``POST /api/util/msgs/{ispb}/1`` to a collector holding it.

Six multipart collectors long-poll one ISPB (default 8 s window). Each round
waits until all six have a request outstanding (and a little longer, so the
server is waiting on it), posts one message and times its arrival. Rounds are
repeated, in several runs with fresh collectors (so they land on different
workers); the result is the median over runs of each run's percentiles.

With ``--auth token`` the gunicorn runs with ``PIXSTREAM_AUTH=token`` and every
request carries a bearer token (the collectors their ISPB's, the poster an
admin's). ``--auth both`` starts one gunicorn per mode on the same database and
runs none, token, none, token... so that both see the same machine; it reports
each mode's figures and the ratio token/none.

    python bench/push_latency.py [--rounds 200] [--runs 3] [--auth none|token|both]
"""

from gevent import monkey

monkey.patch_all()

import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402

import _common as c  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
TARGET_P50_MS = 5.0
TARGET_P99_MS = 20.0


class Collectors:
    """N collectors on one ISPB; record when each message arrives."""

    def __init__(self, port: int, ispb: str, count: int, headers: dict[str, str]) -> None:
        self.port, self.ispb = port, ispb
        self.headers = {**ACCEPT, **headers}
        self.outstanding_since: list[float | None] = [None] * count
        self.arrivals: list[tuple[float, list[str]]] = []
        self.arrived = Event()
        self.errors: list[str] = []
        self.stopping = False
        self.greenlets = [gevent.spawn(self._run, i) for i in range(count)]

    def _run(self, index: int) -> None:
        conn = c.HttpConn("127.0.0.1", self.port, timeout=30)
        path = f"/api/pix/{self.ispb}/stream/start"
        try:
            while not self.stopping:
                conn.send("GET", path, self.headers)
                self.outstanding_since[index] = time.perf_counter()
                reply = conn.receive()
                now = time.perf_counter()
                self.outstanding_since[index] = None
                if reply.status == 200:
                    ids = [doc["endToEndId"] for doc in reply.json()]
                    self.arrivals.append((now, ids))
                    self.arrived.set()
                elif reply.status != 204:
                    self.errors.append(f"{reply.status} {reply.body[:200]!r}")
                    return
                path = reply.pull_next or path
        except Exception as exc:  # a bench reports failures, it does not hide them
            if not self.stopping:
                self.errors.append(repr(exc))
        finally:
            conn.close()

    def all_waiting(self, settle: float) -> bool:
        now = time.perf_counter()
        return all(t is not None and now - t >= settle for t in self.outstanding_since)

    def stop(self) -> None:
        self.stopping = True
        gevent.killall(self.greenlets, timeout=2)


def run_rounds(
    port: int, collectors: int, rounds: int, warmup: int, credentials: c.Credentials
) -> dict[str, object]:
    ispb = c.random_ispb()
    admin = credentials.admin()
    group = Collectors(port, ispb, collectors, credentials.bank(ispb))
    poster = c.HttpConn("127.0.0.1", port)
    latencies: list[float] = []
    from_sent: list[float] = []
    post_rtts: list[float] = []
    early = 0
    meter = None
    try:
        for round_no in range(warmup + rounds):
            if round_no == warmup:
                meter = c.CpuMeter().start()
            deadline = time.monotonic() + 10
            # Every collector has a request out, sent long enough ago that the
            # server has run its claim and is waiting on the listener.
            while not group.all_waiting(settle=0.03):
                if group.errors or time.monotonic() > deadline:
                    raise RuntimeError(f"collectors not waiting: {group.errors[:3]}")
                gevent.sleep(0.002)
            gevent.sleep(random.uniform(0, 0.02))
            group.arrived.clear()
            group.arrivals.clear()
            sent = time.perf_counter()
            c.post_messages(poster, ispb, 1, admin)
            returned = time.perf_counter()
            if not group.arrived.wait(timeout=10):
                raise RuntimeError(f"message of round {round_no} never arrived: {group.errors}")
            gevent.sleep(0.005)  # let any (wrong) duplicate show up
            got = [i for _, ids in group.arrivals for i in ids]
            if len(got) != 1:
                raise RuntimeError(f"round {round_no}: expected one message, got {got}")
            arrived = group.arrivals[0][0]
            if round_no >= warmup:
                early += arrived < returned
                latencies.append(max(0.0, arrived - returned))
                from_sent.append(arrived - sent)
                post_rtts.append(returned - sent)
    finally:
        cpu = meter.stop() if meter else {}
        group.stop()
        poster.close()
    return {
        "p50_ms": c.ms(c.percentile(latencies, 50), 3),
        "p90_ms": c.ms(c.percentile(latencies, 90), 3),
        "p99_ms": c.ms(c.percentile(latencies, 99), 3),
        "max_ms": c.ms(max(latencies), 3),
        "from_post_sent_p50_ms": c.ms(c.percentile(from_sent, 50), 3),
        "from_post_sent_p99_ms": c.ms(c.percentile(from_sent, 99), 3),
        "post_rtt_p50_ms": c.ms(c.percentile(post_rtts, 50), 3),
        "arrived_before_post_returned": early,
        "client_cpu_share": cpu.get("client_cpu_share"),
        "machine_cpu_cores_busy": cpu.get("machine_cpu_cores_busy"),
        "_latencies": latencies,
    }


def summarize(runs: list[dict[str, object]], errors: list[str]) -> dict[str, object]:
    """One mode's result: medians over its runs of each run's percentiles."""
    pooled = [x for run in runs for x in run.pop("_latencies")]  # type: ignore[attr-defined]
    p50 = c.median([r["p50_ms"] for r in runs])  # type: ignore[misc]
    p99 = c.median([r["p99_ms"] for r in runs])  # type: ignore[misc]
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "p90_ms": c.median([r["p90_ms"] for r in runs]),  # type: ignore[misc]
        "max_ms": max(r["max_ms"] for r in runs),  # type: ignore[type-var]
        "pooled_p50_ms": c.ms(c.percentile(pooled, 50), 3),
        "pooled_p99_ms": c.ms(c.percentile(pooled, 99), 3),
        # The POST's own round trip: in token mode it includes the admin token's check.
        "post_rtt_p50_ms": c.median([r["post_rtt_p50_ms"] for r in runs]),  # type: ignore[misc]
        "client_cpu_share": c.median([r["client_cpu_share"] for r in runs]),  # type: ignore[misc]
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
        "met": bool(p50 is not None and p99 is not None)
        and p50 <= TARGET_P50_MS
        and p99 <= TARGET_P99_MS,
        "server_errors": errors[:5],
        "per_run": runs,
    }


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--rounds", type=int, default=200)
    args.add_argument("--runs", type=int, default=3)
    args.add_argument("--warmup", type=int, default=30)
    args.add_argument("--collectors", type=int, default=6)
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--time-limit", type=float, default=None, help="default: 600 s per mode")
    c.add_auth_option(args)
    opts = args.parse_args()
    modes = c.auth_modes(opts.auth)
    c.start_watchdog(opts.time_limit or 600 * len(modes), "push_latency")
    c.raise_nofile()
    load_before = c.loadavg()
    servers: dict[str, c.Gunicorn] = {}
    credentials: dict[str, c.Credentials] = {}
    with c.database() as db:
        try:
            for mode in modes:
                servers[mode] = c.Gunicorn(db.url, workers=opts.workers, settings={"AUTH": mode})
                credentials[mode] = c.Credentials(db.url, mode)
                c.check_auth(servers[mode], credentials[mode])
            runs: dict[str, list[dict[str, object]]] = {mode: [] for mode in modes}
            for run in range(opts.runs):
                for mode in modes:  # alternately: both modes see the same machine
                    quiet = c.wait_quiet()
                    c.log(f"push_latency run {run + 1}/{opts.runs} auth={mode} "
                          f"(machine busy {quiet} cores)")  # fmt: skip
                    result = run_rounds(servers[mode].port, opts.collectors, opts.rounds,
                                        opts.warmup, credentials[mode])  # fmt: skip
                    result["machine_busy_before"] = quiet
                    runs[mode].append(result)
                    c.log(f"  p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
            errors = {mode: server.error_lines() for mode, server in servers.items()}
        finally:
            for credential in credentials.values():
                credential.close()
            for server in servers.values():
                server.stop()
    common = {
        "bench": "push_latency",
        "database": db.kind,
        "workers": next(iter(servers.values())).workers,
        "collectors": opts.collectors,
        "rounds_per_run": opts.rounds,
        "runs": opts.runs,
        "auth": opts.auth,
    }
    results = {mode: summarize(runs[mode], errors[mode]) for mode in modes}
    c.emit_by_mode(
        common, results, load_before,
        headline=("p50_ms", "p99_ms"),
        ratio_keys=("p50_ms", "p99_ms", "pooled_p50_ms", "pooled_p99_ms", "post_rtt_p50_ms"),
        # Latency: token may be at most 10 % slower than none (issue #10).
        within_10pct=lambda r: all(
            r[key] is not None and r[key] <= 1.10  # type: ignore[operator]
            for key in ("p50_ms", "p99_ms")
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
