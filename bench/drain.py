"""Drain: 20,000 queued messages collected end to end by 6 multipart collectors.

The messages are inserted first (one ``POST /api/util/msgs/{ispb}/20000``),
then six collectors start together and follow ``Pull-Next`` until 204 (long
poll of 1.5 s so the tail 204 is quick). Throughput is counted from the first
``stream/start`` sent to the last message received (not to the 204). Every
message must arrive exactly once: endToEndIds unique, count = 20,000, all
addressed to the ISPB. The result is the median of several runs.

With ``--auth token`` the gunicorn runs with ``PIXSTREAM_AUTH=token`` and every
request carries a bearer token (the collectors their ISPB's, the seeding POST
an admin's). ``--auth both`` starts one gunicorn per mode on the same database
and runs none, token, none, token... so that both see the same machine; it
reports each mode's figures and the ratio token/none.

    python bench/drain.py [--messages 20000] [--runs 5] [--auth none|token|both]
"""

from gevent import monkey

monkey.patch_all()

import time  # noqa: E402

import gevent  # noqa: E402

import _common as c  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
TARGET_RATE = 8000.0
LONG_POLL_SECONDS = 1.5  # 1 would need POOL_TIMEOUT_SECONDS < 3 (config validation)


def collect(
    port: int,
    ispb: str,
    headers: dict[str, str],
    out: list[tuple[float, list[dict]]],
    errors: list[str],
) -> int:
    """Start a stream and follow it until 204; append (arrival time, batch); return requests."""
    conn = c.HttpConn("127.0.0.1", port, timeout=30)
    accept = {**ACCEPT, **headers}
    path = f"/api/pix/{ispb}/stream/start"
    requests = 0
    try:
        while True:
            reply = conn.request("GET", path, accept)
            now = time.perf_counter()
            requests += 1
            if reply.status == 204:
                # Close the stream: the last batch was confirmed by this very GET.
                conn.request("DELETE", reply.pull_next or path, headers)
                return requests
            if reply.status != 200:
                errors.append(f"{reply.status} {reply.body[:200]!r}")
                return requests
            out.append((now, reply.json()))
            path = reply.pull_next or path
    except Exception as exc:
        errors.append(repr(exc))
        return requests
    finally:
        conn.close()


def drain_once(
    messages: int,
    collectors: int,
    server: c.Gunicorn,
    backends: c.BackendCpu,
    credentials: c.Credentials,
) -> dict:
    port = server.port
    ispb = c.random_ispb()
    headers = credentials.bank(ispb)  # made here, before the clock starts
    seeder = c.HttpConn("127.0.0.1", port, timeout=120)
    seeded_at = time.perf_counter()
    inserted = c.post_messages(seeder, ispb, messages, credentials.admin())
    seed_s = time.perf_counter() - seeded_at
    seeder.close()
    if inserted != messages:
        raise RuntimeError(f"inserted {inserted}, wanted {messages}")
    batches: list[tuple[float, list[dict]]] = []
    errors: list[str] = []
    meter = c.CpuMeter(server, backends=backends).start()
    started = time.perf_counter()
    jobs = [gevent.spawn(collect, port, ispb, headers, batches, errors) for _ in range(collectors)]
    gevent.joinall(jobs, timeout=300)
    cpu = meter.stop()
    last = max((t for t, _ in batches), default=started)
    ids = [doc["endToEndId"] for _, batch in batches for doc in batch]
    wrong_ispb = sum(1 for _, batch in batches for doc in batch if doc["recebedor"]["ispb"] != ispb)
    elapsed = last - started
    requests = sum(j.value or 0 for j in jobs)
    return {
        "messages_received": len(ids),
        "unique": len(set(ids)),
        "wrong_ispb": wrong_ispb,
        "exactly_once": len(ids) == messages and len(set(ids)) == messages and not wrong_ispb,
        "seconds": round(elapsed, 3),
        "messages_per_s": round(len(set(ids)) / elapsed, 1) if elapsed > 0 else None,
        "requests": requests,
        "gunicorn_cpu_ms_per_request": round(1000 * cpu["gunicorn_cpu_s"] / requests, 3),
        "db_cpu_ms_per_request": round(1000 * cpu["db_backends_cpu_s"] / requests, 3),
        "mean_batch": round(len(ids) / max(1, len(batches)), 2),
        "seed_s": round(seed_s, 3),
        "errors": errors[:5],
        **{k: v for k, v in cpu.items() if k != "wall_s"},
    }


def summarize(runs: list[dict], statuses: dict[str, int], errors: list[str]) -> dict:
    """One mode's result: medians over its runs."""
    rate = c.median([r["messages_per_s"] for r in runs])
    exact = all(r["exactly_once"] for r in runs)
    return {
        "messages_per_s": rate,
        "seconds": c.median([r["seconds"] for r in runs]),
        "exactly_once_all_runs": exact,
        "client_cpu_share": c.median([r["client_cpu_share"] for r in runs]),
        "gunicorn_cpu_share": c.median([r["gunicorn_cpu_share"] for r in runs]),
        "db_backends_cpu_share": c.median([r["db_backends_cpu_share"] for r in runs]),
        "gunicorn_cpu_ms_per_request": c.median([r["gunicorn_cpu_ms_per_request"] for r in runs]),
        "db_cpu_ms_per_request": c.median([r["db_cpu_ms_per_request"] for r in runs]),
        "machine_cpu_cores_busy": c.median([r["machine_cpu_cores_busy"] for r in runs]),
        "target_messages_per_s": TARGET_RATE,
        "met": bool(rate is not None and rate >= TARGET_RATE and exact),
        "server_statuses": statuses,
        "server_errors": errors[:5],
        "per_run": runs,
    }


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--messages", type=int, default=20_000)
    args.add_argument("--runs", type=int, default=5)
    args.add_argument("--collectors", type=int, default=6)
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--time-limit", type=float, default=None, help="default: 900 s per mode")
    c.add_auth_option(args)
    opts = args.parse_args()
    modes = c.auth_modes(opts.auth)
    c.start_watchdog(opts.time_limit or 900 * len(modes), "drain")
    c.raise_nofile()
    load_before = c.loadavg()
    servers: dict[str, c.Gunicorn] = {}
    credentials: dict[str, c.Credentials] = {}
    with c.database() as db:
        backends = c.BackendCpu(db)
        try:
            for mode in modes:
                servers[mode] = c.Gunicorn(db.url, workers=opts.workers,
                                           settings={"LONG_POLL_SECONDS": LONG_POLL_SECONDS,
                                                     "AUTH": mode})  # fmt: skip
                credentials[mode] = c.Credentials(db.url, mode)
                c.check_auth(servers[mode], credentials[mode])
                c.log(f"drain warm-up auth={mode}")
                drain_once(2000, opts.collectors, servers[mode], backends, credentials[mode])
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for run in range(opts.runs):
                for mode in modes:  # alternately: both modes see the same machine
                    quiet = c.wait_quiet()
                    c.log(f"drain run {run + 1}/{opts.runs} auth={mode} "
                          f"(machine busy {quiet} cores)")  # fmt: skip
                    result = drain_once(opts.messages, opts.collectors, servers[mode], backends,
                                        credentials[mode])  # fmt: skip
                    result["machine_busy_before"] = quiet
                    runs[mode].append(result)
                    c.log(f"  {result['messages_per_s']} messages/s")
            errors = {mode: server.error_lines() for mode, server in servers.items()}
            statuses = {mode: server.status_counts() for mode, server in servers.items()}
        finally:
            backends.close()
            for credential in credentials.values():
                credential.close()
            for server in servers.values():
                server.stop()
    common = {
        "bench": "drain",
        "database": db.kind,
        "workers": next(iter(servers.values())).workers,
        "collectors": opts.collectors,
        "messages": opts.messages,
        "runs": opts.runs,
        "auth": opts.auth,
    }
    results = {mode: summarize(runs[mode], statuses[mode], errors[mode]) for mode in modes}
    c.emit_by_mode(
        common, results, load_before,
        headline=("messages_per_s",),
        ratio_keys=("messages_per_s", "gunicorn_cpu_ms_per_request", "db_cpu_ms_per_request"),
        # Throughput: token may be at most 10 % slower than none (issue #10).
        within_10pct=lambda r: r["messages_per_s"] is not None and r["messages_per_s"] >= 0.90,
    )  # fmt: skip


if __name__ == "__main__":
    main()
