"""Drain: 20,000 queued messages collected end to end by 6 multipart collectors.

The messages are inserted first (one ``POST /api/util/msgs/{ispb}/20000``),
then six collectors start together and follow ``Pull-Next`` until 204 (long
poll of 1.5 s so the tail 204 is quick). Throughput is counted from the first
``stream/start`` sent to the last message received (not to the 204). Every
message must arrive exactly once: endToEndIds unique, count = 20,000, all
addressed to the ISPB. The result is the median of several runs.

    python bench/drain.py [--messages 20000] [--runs 5]
"""

from gevent import monkey

monkey.patch_all()

import time  # noqa: E402

import gevent  # noqa: E402

import _common as c  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
TARGET_RATE = 8000.0
LONG_POLL_SECONDS = 1.5  # 1 would need POOL_TIMEOUT_SECONDS < 3 (config validation)


def collect(port: int, ispb: str, out: list[tuple[float, list[dict]]], errors: list[str]) -> int:
    """Start a stream and follow it until 204; append (arrival time, batch); return requests."""
    conn = c.HttpConn("127.0.0.1", port, timeout=30)
    path = f"/api/pix/{ispb}/stream/start"
    requests = 0
    try:
        while True:
            reply = conn.request("GET", path, ACCEPT)
            now = time.perf_counter()
            requests += 1
            if reply.status == 204:
                # Close the stream: the last batch was confirmed by this very GET.
                conn.request("DELETE", reply.pull_next or path)
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
    port: int, messages: int, collectors: int, server: c.Gunicorn, backends: c.BackendCpu
) -> dict:
    ispb = c.random_ispb()
    seeder = c.HttpConn("127.0.0.1", port, timeout=120)
    seeded_at = time.perf_counter()
    inserted = c.post_messages(seeder, ispb, messages)
    seed_s = time.perf_counter() - seeded_at
    seeder.close()
    if inserted != messages:
        raise RuntimeError(f"inserted {inserted}, wanted {messages}")
    batches: list[tuple[float, list[dict]]] = []
    errors: list[str] = []
    meter = c.CpuMeter(server, backends=backends).start()
    started = time.perf_counter()
    jobs = [gevent.spawn(collect, port, ispb, batches, errors) for _ in range(collectors)]
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


def main() -> None:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--messages", type=int, default=20_000)
    args.add_argument("--runs", type=int, default=5)
    args.add_argument("--collectors", type=int, default=6)
    args.add_argument("--workers", type=int, default=None, help="default: gunicorn.conf.py's")
    args.add_argument("--time-limit", type=float, default=900)
    opts = args.parse_args()
    c.start_watchdog(opts.time_limit, "drain")
    c.raise_nofile()
    load_before = c.loadavg()
    with c.database() as db:
        server = c.Gunicorn(db.url, workers=opts.workers,
                            settings={"LONG_POLL_SECONDS": LONG_POLL_SECONDS})  # fmt: skip
        backends = c.BackendCpu(db)
        try:
            c.log("drain warm-up")
            drain_once(server.port, 2000, opts.collectors, server, backends)
            runs = []
            for run in range(opts.runs):
                quiet = c.wait_quiet()
                c.log(f"drain run {run + 1}/{opts.runs} (machine busy {quiet} cores)")
                runs.append(
                    drain_once(server.port, opts.messages, opts.collectors, server, backends)
                )
                runs[-1]["machine_busy_before"] = quiet
                c.log(f"  {runs[-1]['messages_per_s']} messages/s")
            errors = server.error_lines()
            statuses = server.status_counts()
        finally:
            backends.close()
            server.stop()
    rate = c.median([r["messages_per_s"] for r in runs])
    exact = all(r["exactly_once"] for r in runs)
    c.emit(
        {
            "bench": "drain",
            "database": db.kind,
            "workers": server.workers,
            "collectors": opts.collectors,
            "messages": opts.messages,
            "runs": opts.runs,
            "messages_per_s": rate,
            "seconds": c.median([r["seconds"] for r in runs]),
            "exactly_once_all_runs": exact,
            "client_cpu_share": c.median([r["client_cpu_share"] for r in runs]),
            "gunicorn_cpu_share": c.median([r["gunicorn_cpu_share"] for r in runs]),
            "db_backends_cpu_share": c.median([r["db_backends_cpu_share"] for r in runs]),
            "gunicorn_cpu_ms_per_request": c.median(
                [r["gunicorn_cpu_ms_per_request"] for r in runs]
            ),
            "db_cpu_ms_per_request": c.median([r["db_cpu_ms_per_request"] for r in runs]),
            "machine_cpu_cores_busy": c.median([r["machine_cpu_cores_busy"] for r in runs]),
            "target_messages_per_s": TARGET_RATE,
            "met": bool(rate is not None and rate >= TARGET_RATE and exact),
            "server_statuses": statuses,
            "server_errors": errors[:5],
            "loadavg_1m_before": load_before,
            "per_run": runs,
        }
    )


if __name__ == "__main__":
    main()
