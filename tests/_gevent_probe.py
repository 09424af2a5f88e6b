"""Subprocess probe: does psycopg yield to other greenlets under gevent?

    python _gevent_probe.py DATABASE_URL patched|unpatched

``patched`` monkey-patches first and imports psycopg after, as gunicorn's
gevent worker does (preload_app = False). ``unpatched`` is the control: psycopg
is imported before patching, so it keeps its C wait function, which blocks the
whole hub; the probe must then see the other greenlets stall.

Prints one JSON object on its last line of output.
"""

from __future__ import annotations

import sys

MODE = sys.argv[2]
if MODE == "patched":
    from gevent import monkey

    monkey.patch_all()
    import psycopg
elif MODE == "unpatched":
    import psycopg
    from gevent import monkey

    monkey.patch_all()
else:
    raise SystemExit(f"unknown mode {MODE!r}")

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from psycopg import waiting  # noqa: E402

URL = sys.argv[1]
TICK = 0.01
CHANNEL = f"pixstream_probe_{os.getpid()}"  # probes may run side by side


def between(stamps: list[float], start: float, end: float) -> int:
    return sum(1 for stamp in stamps if start < stamp < end)


def ticker(stop: gevent.event.Event, stamps: list[float]) -> None:
    """Count the hub's turns: one per 10 ms while it is free."""
    while not stop.is_set():
        gevent.sleep(TICK)
        stamps.append(time.monotonic())


def querier(conn: psycopg.Connection, stop: gevent.event.Event, stamps: list[float]) -> None:
    """Quick queries on another connection: they complete only if psycopg yields."""
    while not stop.is_set():
        conn.execute("SELECT 1")
        stamps.append(time.monotonic())
        gevent.sleep(TICK)


def probe_query() -> dict[str, float]:
    """SELECT pg_sleep(1) in this greenlet while others tick and query."""
    with (
        psycopg.connect(URL, autocommit=True) as slow,
        psycopg.connect(URL, autocommit=True) as quick,
    ):
        stop = gevent.event.Event()
        ticks: list[float] = []
        queries: list[float] = []
        others = [gevent.spawn(ticker, stop, ticks), gevent.spawn(querier, quick, stop, queries)]
        gevent.sleep(0)  # let them start
        start = time.monotonic()
        slow.execute("SELECT pg_sleep(1)")
        end = time.monotonic()
        stop.set()
        gevent.joinall(others, timeout=5)
    return {
        "seconds": end - start,
        "ticks": between(ticks, start, end),
        "queries": between(queries, start, end),
    }


def probe_listen() -> dict[str, object]:
    """conn.notifies(timeout=1) in this greenlet while others tick and one NOTIFYs."""
    with (
        psycopg.connect(URL, autocommit=True) as listen,
        psycopg.connect(URL, autocommit=True) as other,
    ):
        listen.execute(f"LISTEN {CHANNEL}")
        stop = gevent.event.Event()
        ticks: list[float] = []
        sent: list[float] = []

        def notify_later() -> None:
            gevent.sleep(0.3)
            sent.append(time.monotonic())
            other.execute(f"NOTIFY {CHANNEL}, 'hello'")

        others = [gevent.spawn(ticker, stop, ticks), gevent.spawn(notify_later)]
        gevent.sleep(0)
        received: list[tuple[float, str]] = []
        start = time.monotonic()
        for notify in listen.notifies(timeout=1.0):
            received.append((time.monotonic(), notify.payload))
        end = time.monotonic()
        stop.set()
        gevent.joinall(others, timeout=5)
    return {
        "seconds": end - start,
        "ticks": between(ticks, start, end),
        "payloads": [payload for _, payload in received],
        "latency": received[0][0] - sent[0] if received and sent else None,
    }


if __name__ == "__main__":
    result = {"wait": waiting.wait.__name__, "query": probe_query(), "listen": probe_listen()}
    print(json.dumps(result))
