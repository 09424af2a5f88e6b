"""psycopg under gevent really yields to other greenlets, in our setup.

A gevent worker serves thousands of requests on one OS thread: a database call
or the listener's wait that blocked the hub would freeze them all. psycopg
picks a cooperative wait function only if gevent patched ``select`` before
psycopg was imported. The probe (a subprocess, so that patching is real)
checks a query and the LISTEN wait, next to a control that imports psycopg
too early and must see the hub stall; a real gunicorn worker with a request
stuck on a lock must keep answering others.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from _streamkit import close_all, insert_messages, new_ispb, wait_for
from httpclient import HttpClient

PROBE = Path(__file__).with_name("_gevent_probe.py")
# The ticker takes a turn every 10 ms: about 100 in a free second.
MIN_TURNS = 50


@pytest.fixture(scope="module")
def probes(database_url: str) -> dict[str, dict[str, Any]]:
    def run(mode: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, str(PROBE), database_url, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    with ThreadPoolExecutor(2) as pool:
        patched, unpatched = pool.map(run, ["patched", "unpatched"])
    return {"patched": patched, "unpatched": unpatched}


def test_psycopg_picks_a_cooperative_wait_when_gevent_patched_first(probes):
    assert probes["patched"]["wait"] != "wait_c"


def test_a_query_yields_to_other_greenlets(probes):
    query = probes["patched"]["query"]
    assert query["seconds"] >= 0.95  # pg_sleep(1) really waited
    assert query["ticks"] >= MIN_TURNS, query
    assert query["queries"] >= MIN_TURNS, query  # other connections kept working


def test_the_listen_wait_yields_and_still_receives(probes):
    listen = probes["patched"]["listen"]
    assert listen["seconds"] >= 0.95  # notifies(timeout=1) waited out its timeout
    assert listen["ticks"] >= MIN_TURNS, listen
    # The NOTIFY came from another greenlet during the wait, and arrived at once.
    assert listen["payloads"] == ["hello"]
    assert listen["latency"] < 0.1, listen


def test_the_probe_sees_a_blocked_hub(probes):
    """The control: psycopg imported before patching blocks every greenlet."""
    control = probes["unpatched"]
    assert control["wait"] == "wait_c"
    assert control["query"]["ticks"] <= 2 and control["query"]["queries"] <= 2, control
    assert control["listen"]["ticks"] <= 2 and control["listen"]["payloads"] == [], control


@pytest.mark.server
def test_a_request_stuck_in_the_database_leaves_its_worker_responsive(
    start_server, db, database_url
):
    """One gevent worker: while a stream request waits on a table lock inside
    PostgreSQL, the same worker answers /healthz and runs /readyz's query."""
    server = start_server(workers=1)
    ispb = new_ispb()
    insert_messages(db, ispb, 1)
    stuck = HttpClient(server.base, timeout=30)
    probe = HttpClient(server.base, timeout=3)
    try:
        with ThreadPoolExecutor(1) as pool, psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE pix_stream IN ACCESS EXCLUSIVE MODE")
            blocked = pool.submit(stuck.get, f"/api/pix/{ispb}/stream/start")
            wait_for(
                lambda: db.execute(
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> %s",
                    (locker.info.backend_pid,),
                ).fetchone(),
                timeout=5,
                what="the stream request to wait on the lock",
            )
            for path in ("/healthz", "/readyz"):
                started = time.monotonic()
                reply = probe.request("GET", path, fresh=True)
                elapsed = time.monotonic() - started
                assert reply.status == 200, (path, reply.status, reply.body[:300])
                assert elapsed < 0.5, f"{path} took {elapsed:.2f} s behind a blocked query"
            assert not blocked.done()
            locker.rollback()  # release the lock: the stuck request completes
            reply = blocked.result(timeout=10)
        assert reply.status == 200
    finally:
        close_all([stuck, probe, server.http])
