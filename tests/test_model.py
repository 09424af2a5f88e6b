"""Model-based test of the collection protocol (protocol.md, "Streams and the
limit of 6" and "Delivery guarantees") against a live gunicorn server.

A hypothesis ``RuleBasedStateMachine`` sends random sequences of requests, one
at a time, and checks every answer against an exact model: the status, the
``Pull-Next`` (a fresh id, or the one just used), and which messages come back
in which order (a claim takes the oldest queued messages of the ISPB, up to 10
for ``multipart/json`` and 1 otherwise). After every step the model is also
compared with PostgreSQL: each message queued, held by a stream's current
pull, or confirmed, with its delivery count; each stream open, deleted or
expired, with its current and replay ids and a ``last_seen_at`` that every
successful request moved forward. A final drain (close every stream, read each
ISPB dry with a fresh stream) checks that every message was confirmed exactly
once and delivered again only where the model says (after an expiry, or a
DELETE with the id before an unconfirmed batch).

Time. Requests are sequential, so the only non-determinism is expiry. The idle
window is long (20 s, far more than an example lasts) and the ``let_expire``
rule advances one stream's clock instead of sleeping: it moves that stream's
``last_seen_at`` back by the window, exactly as if the window had passed
without a request on it. The machine runs against two servers:

- "sweeper" (sweep every 0.2 s): the rule polls ``pix_stream.closed_at`` until
  the sweeper has expired the stream;
- "lazy" (no sweeper): the stream stays open until a request expires it, which
  the model predicts: a start or a claim on its ISPB, or any request on it.

Model and rule choice thus stay deterministic, which hypothesis needs to replay
and shrink a failure. Should a stream still expire by itself under the sweeper
(a machine stalled for the whole window), the machine learns it from
``pix_stream``: an expiry that fell inside a request is tried before and after
it, and the ordering that explains the answer is kept.

CI runs 8 examples of 25 steps per server, plus one scripted walk through every
transition per server (about 40 s in all). A longer run:

    PIXSTREAM_MODEL_EXAMPLES=200 PIXSTREAM_MODEL_STEPS=40 python -m pytest tests/test_model.py
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import re
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, TypeVar

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from _streamkit import wait_for
from httpclient import HttpClient, Reply

pytestmark = pytest.mark.server

T = TypeVar("T")

ISPBS = ("32074986", "60701190")
MAX_STREAMS = 6
MAX_BATCH = 10
LONG_POLL = 0.2
IDLE = 20.0
SERVER_SETTINGS: dict[str, Any] = {
    "LONG_POLL_SECONDS": LONG_POLL,
    "STREAM_IDLE_SECONDS": IDLE,
    "SWEEP_SECONDS": 0.2,
    "POOL_TIMEOUT_SECONDS": 1,
    # Every poll claims. The model's clock (let_expire moves last_seen_at back)
    # is invisible to a server that lets idle polls skip their claim: such a
    # poll trusts that an idle window cannot pass unnoticed, and writes its
    # last-seen time a few seconds later. tests/test_quiet_polls.py checks
    # that path across two instances, in real time.
    "IDLE_CLAIM_EVERY": 1,
}
EXPIRY_DEADLINE = 10.0  # how long a stream past its window may take to be swept
MAX_FILLS = 1  # "open streams up to the limit" steps per example (each ~6 long polls)

EXAMPLES = int(os.environ.get("PIXSTREAM_MODEL_EXAMPLES", "8"))
STEPS = int(os.environ.get("PIXSTREAM_MODEL_STEPS", "25"))

MULTIPART = "multipart/json"
ACCEPTS = (None, "application/json", "*/*", MULTIPART)  # all but the last: one message
SAME = "the stream's own"  # continue with the Accept the stream was started with
# Half the reads keep the stream's Accept, the others draw one afresh.
READ_ACCEPTS = st.one_of(st.just(SAME), st.sampled_from(ACCEPTS))
PULL_NEXT = re.compile(r"/api/pix/(?P<ispb>[0-9]{8})/stream/(?P<id>[a-z0-9]{12,64})")
UNKNOWN_ID = "z" * 24  # well formed, never issued (issued ids are random)


# -- the model -----------------------------------------------------------------


@dataclass
class Message:
    id: int  # pix_message.id: the insertion order
    e2e: str
    ispb: str
    state: str = "queued"  # queued | held | confirmed
    pull: str | None = None  # the pull it was last delivered with
    deliveries: int = 0
    confirmations: int = 0
    requeues: int = 0  # given back by an expiry or by a DELETE of the previous id
    document: str | None = None  # canonical JSON of its first delivery


@dataclass
class Stream:
    key: int  # index in Model.streams
    ispb: str
    accept: str | None
    current: str = ""  # the latest Pull-Next
    ids: list[str] = field(default_factory=list)  # every id the client got, oldest first
    state: str = "open"  # open | deleted | expired
    closed_by: str | None = None  # the id of the DELETE that closed it
    idle: bool = False  # open, but past its idle window: expires at the next trigger
    db_id: int | None = None
    replay: str | None = None  # the id whose repeat replays the current batch
    # A start that delivered a batch leaves the server a replay id (the stream's
    # first pull) that the client never saw; learnt from the database.
    hidden_replay: str | None = None
    batch: list[int] = field(default_factory=list)  # messages bound to `current`
    confirmed: bool = True  # the batch bound to `current` is confirmed (or empty)
    batch_body: bytes | None = None  # the body that delivered `batch`
    batch_multipart: bool = False  # whether it was asked for as multipart/json
    last_seen: datetime | None = None  # pix_stream.last_seen_at as last read
    refreshed: bool = False  # a successful request since last_seen was read
    last: Request | None = None  # its latest request with an id, for retries
    last_reply: tuple[int, bytes, str | None] | None = None


@dataclass
class Model:
    messages: dict[int, Message] = field(default_factory=dict)
    streams: list[Stream] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)  # every pull id seen

    def queued(self, ispb: str) -> list[Message]:
        return [m for m in self.messages.values() if m.ispb == ispb and m.state == "queued"]

    def live(self, ispb: str | None = None) -> list[Stream]:
        return [s for s in self.streams if s.state == "open" and ispb in (None, s.ispb)]

    def claim(self, stream: Stream, messages: list[Message], pull: str) -> None:
        for message in messages:
            assert message.state == "queued" and message.ispb == stream.ispb
            message.state, message.pull = "held", pull
            message.deliveries += 1
        stream.batch = [m.id for m in messages]
        stream.confirmed = False

    def confirm(self, stream: Stream) -> None:
        if not stream.confirmed:
            for message_id in stream.batch:
                message = self.messages[message_id]
                message.state = "confirmed"
                message.confirmations += 1
        stream.confirmed = True

    def release(self, stream: Stream) -> None:
        if not stream.confirmed:
            for message_id in stream.batch:
                message = self.messages[message_id]
                message.state, message.pull = "queued", None
                message.requeues += 1
        stream.batch, stream.confirmed = [], True

    def expire(self, stream: Stream) -> None:
        self.release(stream)
        stream.state, stream.idle = "expired", False

    def expire_idle(self, ispb: str) -> None:
        """The lazy expiry a start, a claim or a request on an idle stream runs for its ISPB."""
        for stream in self.live(ispb):
            if stream.idle:
                self.expire(stream)


@dataclass(frozen=True)
class Request:
    method: str  # GET | DELETE
    ispb: str
    pull: str | None  # None: stream/start
    accept: str | None = None
    stream: int | None = None  # the model stream the id belongs to

    @property
    def path(self) -> str:
        return f"/api/pix/{self.ispb}/stream/{self.pull or 'start'}"

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.accept is None else {"Accept": self.accept}

    @property
    def multipart(self) -> bool:
        return self.accept == MULTIPART

    def __repr__(self) -> str:
        return f"{self.method} {self.path} (Accept: {self.accept})"


class Mismatch(Exception):
    """The answer differs from what the model predicts."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Mismatch(what)


def expect_problem(reply: Reply, status: int) -> None:
    expect(reply.status == status, f"status {reply.status}, expected {status}: {reply.body!r}")
    content_type = reply.header("Content-Type") or ""
    expect(content_type.startswith("application/problem+json"), f"content type {content_type}")
    expect(json.loads(reply.body).get("status") == status, f"problem body {reply.body!r}")


def fresh_pull(model: Model, reply: Reply, ispb: str) -> str:
    """The reply's Pull-Next, which must be a new id of ``ispb``."""
    match = PULL_NEXT.fullmatch(reply.pull_next or "")
    expect(match is not None, f"Pull-Next {reply.pull_next!r} is not a stream path")
    assert match is not None
    expect(match["ispb"] == ispb, f"Pull-Next {reply.pull_next} is not of ISPB {ispb}")
    expect(match["id"] not in model.issued, f"Pull-Next {reply.pull_next} is not a new id")
    model.issued.add(match["id"])
    return match["id"]


def expect_same_pull(reply: Reply, ispb: str, pull: str) -> None:
    wanted = f"/api/pix/{ispb}/stream/{pull}"
    expect(reply.pull_next == wanted, f"Pull-Next {reply.pull_next}, expected {wanted}")


def expect_empty(reply: Reply) -> None:
    expect(reply.status == 204, f"status {reply.status}, expected 204: {reply.body[:200]!r}")
    expect(reply.body == b"", "204 with a body")


def expect_batch(req: Request, messages: list[Message], reply: Reply) -> None:
    """A 200 carrying exactly ``messages``, in this order, shaped for ``req``'s Accept."""
    wanted = [m.e2e for m in messages]
    expect(reply.status == 200, f"status {reply.status}, expected 200 with {wanted}")
    content_type = reply.header("Content-Type") or ""
    expect(content_type.startswith("application/json"), f"content type {content_type}")
    body = json.loads(reply.body, parse_float=Decimal)
    if req.multipart:
        expect(isinstance(body, list), f"multipart body is not an array: {reply.body[:80]!r}")
        documents = body
    else:
        expect(isinstance(body, dict), f"single body is not an object: {reply.body[:80]!r}")
        documents = [body]
    got = [d.get("endToEndId") for d in documents]
    expect(got == wanted, f"delivered {got}, expected the oldest queued {wanted}")
    for message, document in zip(messages, documents, strict=True):
        recipient = document["recebedor"]["ispb"]
        expect(recipient == req.ispb, f"{message.e2e} for {recipient} sent to {req.ispb}")
        text = json.dumps(document, sort_keys=True, default=str)
        if message.document is None:
            message.document = text
        expect(message.document == text, f"{message.e2e} changed between deliveries")


def apply(model: Model, req: Request, reply: Reply) -> None:
    """Check ``reply`` against the model and advance the model; raise Mismatch."""
    if req.pull is None:
        _apply_start(model, req, reply)
        return
    if req.stream is None or req.ispb != model.streams[req.stream].ispb:
        expect_problem(reply, 404)  # never issued, or issued to another ISPB
        return
    stream = model.streams[req.stream]
    if stream.state == "deleted" and req.method == "DELETE" and req.pull == stream.closed_by:
        expect(reply.status == 200, f"repeated DELETE: {reply.status}, expected 200 again")
        expect(json.loads(reply.body) == {}, f"DELETE body {reply.body!r}")
        return
    if stream.state != "open":
        expect_problem(reply, 410)
        return
    if stream.idle:  # found idle: expired on the spot, with the ISPB's other idle streams
        model.expire_idle(stream.ispb)
        expect_problem(reply, 410)
        return
    if req.method == "DELETE":
        if req.pull == stream.current:
            model.confirm(stream)
        elif req.pull == stream.replay:
            model.release(stream)  # the client never saw the current batch
        else:
            expect_problem(reply, 410)
            return
        expect(reply.status == 200, f"status {reply.status}, expected 200: {reply.body!r}")
        expect(json.loads(reply.body) == {}, f"DELETE body {reply.body!r}")
        stream.state, stream.closed_by = "deleted", req.pull
        return
    if req.pull == stream.replay:
        batch = [model.messages[m] for m in stream.batch]
        if req.multipart == stream.batch_multipart:
            expect(reply.status == 200, f"replay status {reply.status}, expected 200")
            expect(reply.body == stream.batch_body, "replay body differs from the original")
        elif len(batch) > 1:  # a batch of several, asked for again as one message
            expect_problem(reply, 406)
            stream.last_seen = None  # the stream was touched all the same
            return
        else:  # the same message, as an array of one or as a single object
            expect_batch(req, batch, reply)
        expect_same_pull(reply, stream.ispb, stream.current)
    elif req.pull == stream.current:
        model.confirm(stream)
        model.expire_idle(stream.ispb)  # batches abandoned by idle streams: claimable now
        claimable = model.queued(stream.ispb)[: MAX_BATCH if req.multipart else 1]
        stream.hidden_replay = None
        if claimable:
            expect_batch(req, claimable, reply)
            pull = fresh_pull(model, reply, stream.ispb)
            model.claim(stream, claimable, pull)
            stream.replay, stream.current, stream.batch_body = req.pull, pull, reply.body
            stream.batch_multipart = req.multipart
            stream.ids.append(pull)
        else:
            expect_empty(reply)
            expect_same_pull(reply, stream.ispb, req.pull)  # a 204 repeats the id used
            stream.replay, stream.batch, stream.batch_body = None, [], None
    else:
        expect_problem(reply, 410)  # superseded
        return
    stream.refreshed = True


def _apply_start(model: Model, req: Request, reply: Reply) -> None:
    model.expire_idle(req.ispb)
    if len(model.live(req.ispb)) >= MAX_STREAMS:
        expect_problem(reply, 429)
        retry_after = reply.header("Retry-After") or ""
        expect(retry_after.isdigit() and int(retry_after) >= 1, f"Retry-After {retry_after!r}")
        return
    stream = Stream(len(model.streams), req.ispb, req.accept, refreshed=True)
    claimable = model.queued(req.ispb)[: MAX_BATCH if req.multipart else 1]
    if claimable:
        expect_batch(req, claimable, reply)
    else:
        expect_empty(reply)
    stream.current = fresh_pull(model, reply, req.ispb)
    stream.ids.append(stream.current)
    model.streams.append(stream)
    if claimable:
        model.claim(stream, claimable, stream.current)
        stream.batch_body, stream.batch_multipart = reply.body, req.multipart


def check_model(model: Model) -> None:
    """Invariants of the model itself, which every answer so far agreed with."""
    holders: dict[int, int] = {}
    for stream in model.streams:
        if stream.confirmed:
            continue
        assert stream.state == "open", f"closed stream {stream.key} holds a batch"
        for message_id in stream.batch:
            message = model.messages[message_id]
            assert message.ispb == stream.ispb, f"{message.e2e} held by a stream of another ISPB"
            assert message.state == "held" and message.pull == stream.current, message
            assert message_id not in holders, f"{message.e2e} held by two live streams"
            holders[message_id] = stream.key
    for message in model.messages.values():
        assert message.confirmations <= 1, f"{message.e2e} confirmed twice"
        assert (message.state == "held") == (message.id in holders), message
        assert message.deliveries == message.requeues + (message.state != "queued"), message


# -- the database side ----------------------------------------------------------


@dataclass(frozen=True)
class StreamRow:
    id: int
    ispb: str
    current_pull: str
    replay_pull: str | None
    close_reason: str | None
    closed_by_pull: str | None
    last_seen_at: datetime
    idle_before_close: float | None  # seconds from last_seen_at to closed_at


@dataclass(frozen=True)
class Snapshot:
    streams: dict[int, StreamRow]
    messages: list[tuple[int, str, str | None, int, bool]]


def snapshot(db: psycopg.Connection) -> Snapshot:
    """Streams and messages as of one instant."""
    with db.transaction():
        db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        streams = db.execute(
            "SELECT id, ispb, current_pull, replay_pull, close_reason, closed_by_pull,"
            " last_seen_at, extract(epoch FROM closed_at - last_seen_at)::float8"
            " FROM pix_stream"
        ).fetchall()
        messages = db.execute(
            "SELECT m.id, m.recipient_ispb, m.pull_id, m.delivery_count,"
            " p.confirmed_at IS NOT NULL"
            " FROM pix_message m LEFT JOIN pix_pull p ON p.id = m.pull_id ORDER BY m.id"
        ).fetchall()
    return Snapshot({row[0]: StreamRow(*row) for row in streams}, messages)


def truncate(db: psycopg.Connection) -> None:
    """Empty the tables between examples. The server's sweeper locks them in
    another order: give way (lock timeout, retry) rather than deadlock with it."""
    for _ in range(50):
        try:
            with db.transaction():
                db.execute("SET LOCAL lock_timeout = '100ms'")
                db.execute("TRUNCATE pix_message, pix_pull, pix_stream RESTART IDENTITY CASCADE")
            return
        except psycopg.errors.LockNotAvailable:
            continue
    pytest.fail("could not truncate the tables")


def pick(items: list[T], index: int) -> T:
    return items[index % len(items)]


def step(method: Callable[..., None]) -> Callable[..., None]:
    """Mark the machine unhealthy while a step runs, so teardown skips the drain
    after a failure (its own errors would hide the real one from the shrinker)."""

    @functools.wraps(method)
    def wrapper(self: ProtocolMachine, *args: Any, **kwargs: Any) -> None:
        self.healthy = False
        method(self, *args, **kwargs)
        self.healthy = True

    return wrapper


def stale_ids(stream: Stream) -> list[str]:
    """Ids of ``stream`` that answer 410: superseded, or of a closed stream."""
    if stream.state != "open":
        return stream.ids
    return [pull for pull in stream.ids if pull not in (stream.current, stream.replay)]


# -- the machine ----------------------------------------------------------------


class ProtocolMachine(RuleBasedStateMachine):
    base: str = ""
    db: psycopg.Connection
    # With the sweeper off, only requests expire streams (lazily), at moments the
    # model predicts; with it on, the machine learns expiries from the database.
    sweeper: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.http = HttpClient(self.base)
        self.model = Model()
        self.healthy = True
        self.fills = 0
        truncate(self.db)

    # -- plumbing ---------------------------------------------------------------

    def _send(self, req: Request, *, copies: int = 1) -> Reply:
        """Send one protocol request and fold its answer into the model.

        With ``copies`` > 1 the same request goes out that many times at once, on
        separate connections (a request and its retries in flight together): every
        copy must get the same answer, which the model then takes as one request's.
        """
        before = self.model
        reply = self._exchange(req, copies)
        snap = snapshot(self.db)
        # Live streams that expired by themselves meanwhile: before or after this request?
        expired = [
            s.key
            for s in before.live()
            if self.sweeper
            and not s.idle
            and s.db_id is not None
            and snap.streams[s.db_id].close_reason == "expired"
        ]
        failures = []
        for count in range(len(expired) + 1):
            for first in itertools.combinations(expired, count):
                model = copy.deepcopy(before)
                for key in first:
                    model.expire(model.streams[key])
                try:
                    apply(model, req, reply)
                except Mismatch as exc:
                    failures.append(f"  streams {list(first)} expired first: {exc}")
                    continue
                except Exception:
                    failures.append(
                        f"  streams {list(first)} expired first: {traceback.format_exc()}"
                    )
                    continue
                for key in expired:
                    if model.streams[key].state == "open":
                        model.expire(model.streams[key])
                if req.stream is not None:
                    model.streams[req.stream].last = req
                    model.streams[req.stream].last_reply = (
                        reply.status,
                        reply.body,
                        reply.pull_next,
                    )
                self.model = model
                self._sync(snap)
                return reply
        pytest.fail(
            f"{req!r} answered {reply.status} Pull-Next={reply.pull_next} "
            f"body={reply.body[:300]!r}\nwhich the model does not explain:\n" + "\n".join(failures)
        )

    def _exchange(self, req: Request, copies: int) -> Reply:
        if copies == 1:
            return self.http.request(req.method, req.path, req.headers, fresh=True)
        clients = [HttpClient(self.base) for _ in range(copies)]
        try:
            for client in clients:  # connected first: the barrier releases requests
                assert client.request("GET", "/healthz").status == 200
            barrier = threading.Barrier(copies)

            def send(client: HttpClient) -> Reply:
                barrier.wait(timeout=10)
                return client.request(req.method, req.path, req.headers)

            with ThreadPoolExecutor(copies) as pool:
                replies = list(pool.map(send, clients))
        finally:
            for client in clients:
                client.close()
        answers = {(r.status, r.pull_next, r.body) for r in replies}
        if len(answers) > 1:
            pytest.fail(
                f"{copies} copies of {req!r} in flight together got different answers: "
                f"{[(r.status, r.pull_next, r.body[:100]) for r in replies]}"
            )
        return replies[0]

    def _sync(self, snap: Snapshot) -> None:
        """Apply the expiries the database shows, then compare it with the model."""
        model = self.model
        for stream in model.streams:
            if stream.db_id is None:  # opened by the last request: find its row
                (row,) = [r for r in snap.streams.values() if r.current_pull == stream.current]
                stream.db_id = row.id
                if stream.batch:  # a start that delivered: its first pull is the replay id
                    assert row.replay_pull is not None and row.replay_pull not in model.issued
                    stream.hidden_replay = row.replay_pull
                    model.issued.add(row.replay_pull)
            row = snap.streams[stream.db_id]
            assert row.ispb == stream.ispb
            if stream.state == "open" and row.close_reason == "expired" and self.sweeper:
                model.expire(stream)
            if stream.state == "open":
                assert row.close_reason is None, f"stream {stream.key} closed: {row}"
                assert row.current_pull == stream.current, f"stream {stream.key}: {row}"
                replay = stream.replay or stream.hidden_replay
                assert row.replay_pull == replay, f"stream {stream.key} replay: {row}, {replay}"
                if stream.refreshed:
                    assert stream.last_seen is None or row.last_seen_at > stream.last_seen, (
                        f"stream {stream.key}: a successful request left last_seen_at alone"
                    )
                elif stream.last_seen is not None:
                    assert row.last_seen_at >= stream.last_seen, f"stream {stream.key}: {row}"
            else:
                assert row.close_reason == stream.state, f"stream {stream.key}: {row}"
                assert row.closed_by_pull == stream.closed_by, f"stream {stream.key}: {row}"
            if row.close_reason == "expired":
                assert row.idle_before_close is not None
                assert row.idle_before_close >= IDLE, f"expired before its idle window: {row}"
            stream.last_seen, stream.refreshed = row.last_seen_at, False
        assert len(snap.messages) == len(model.messages), "messages appeared or vanished"
        for message_id, ispb, pull, deliveries, confirmed in snap.messages:
            message = model.messages[message_id]
            got = (ispb, pull, deliveries, confirmed)
            wanted = (message.ispb, message.pull, message.deliveries, message.state == "confirmed")
            assert got == wanted, f"{message} in the database: (ispb, pull, count, confirmed) {got}"
        check_model(model)

    def _request_on(
        self, stream: Stream, method: str, pull: str, accept: str | None = SAME
    ) -> Reply:
        accept = stream.accept if accept == SAME else accept
        return self._send(Request(method, stream.ispb, pull, accept, stream.key))

    # -- rules ----------------------------------------------------------------------

    @initialize(first=st.integers(0, 25), second=st.integers(0, 25))
    @step
    def seed(self, first: int, second: int) -> None:
        """Start each example with some messages queued, so that streams have work."""
        for ispb, n in zip(ISPBS, (first, second), strict=True):
            if n:
                self.insert(ispb, n)

    @rule(ispb=st.sampled_from(ISPBS), n=st.integers(0, 25))
    @step
    def insert(self, ispb: str, n: int) -> None:
        """POST n random messages (0 is refused); the model learns them in id order."""
        reply = self.http.request("POST", f"/api/util/msgs/{ispb}/{n}", fresh=True)
        if n == 0:
            expect_problem(reply, 400)
            return
        assert reply.status == 201 and reply.json() == {"inserted": n}, reply
        known = max(self.model.messages, default=0)
        rows = self.db.execute(
            "SELECT id, end_to_end_id, recipient_ispb FROM pix_message WHERE id > %s ORDER BY id",
            (known,),
        ).fetchall()
        assert len(rows) == n and all(row[2] == ispb for row in rows), rows
        for message_id, e2e, recipient in rows:
            self.model.messages[message_id] = Message(message_id, e2e, recipient)

    @rule(ispb=st.sampled_from(ISPBS), accept=st.sampled_from(ACCEPTS))
    @step
    def start(self, ispb: str, accept: str | None) -> None:
        """Open a stream (a seventh open one on the ISPB gets 429)."""
        self._send(Request("GET", ispb, None, accept))

    @precondition(lambda self: self.fills < MAX_FILLS)
    @rule(ispb=st.sampled_from(ISPBS), accept=st.sampled_from(ACCEPTS))
    @step
    def start_beyond_the_limit(self, ispb: str, accept: str | None) -> None:
        """Open streams until six are open, then a seventh: 429 with Retry-After."""
        self.fills += 1
        while len(self.model.live(ispb)) < MAX_STREAMS:
            self._send(Request("GET", ispb, None, accept))
        assert self._send(Request("GET", ispb, None, accept)).status == 429

    @rule(i=st.integers(0, 7), accept=READ_ACCEPTS)
    @step
    def continue_stream(self, i: int, accept: str | None) -> None:
        """Follow the latest Pull-Next: confirms the batch it delivered, claims the next
        (as many as this request's Accept allows). With no stream open, open one."""
        if not self.model.live():
            self._send(
                Request("GET", pick(list(ISPBS), i), None, None if accept == SAME else accept)
            )
            return
        stream = pick(self.model.live(), i)
        self._request_on(stream, "GET", stream.current, accept)

    @precondition(lambda self: any(s.last for s in self.model.streams))
    @rule(i=st.integers(0, 7))
    @step
    def retry(self, i: int) -> None:
        """Repeat a stream's latest request: an answer with messages comes back identical."""
        stream = pick([s for s in self.model.streams if s.last], i)
        req, previous = stream.last, stream.last_reply
        assert req is not None and previous is not None
        live = stream.state == "open" and not stream.idle
        reading = req.method == "GET" and live and req.pull == stream.replay
        # The DELETE that closed the stream, repeated, answers 200 {} again.
        closing = req.method == "DELETE" and stream.state == "deleted"
        closing = closing and req.pull == stream.closed_by
        reply = self._send(req)
        if (reading or closing) and req.ispb == stream.ispb:
            assert (reply.status, reply.body, reply.pull_next) == previous

    @precondition(lambda self: self.model.streams)
    @rule(i=st.integers(0, 7), j=st.integers(0, 9), delete=st.booleans(), copies=st.integers(2, 4))
    @step
    def repeat_concurrently(self, i: int, j: int, delete: bool, copies: int) -> None:
        """A request and its retries in flight at once (a client whose timeout is shorter
        than the answer, a proxy's retry): on the latest id, the replayable one or an older
        one, every copy gets the one answer the model predicts for a single request."""
        stream = pick(self.model.streams, i)
        pull = pick([p for p in (stream.current, stream.replay) if p] + stream.ids, j)
        method = "DELETE" if delete else "GET"
        self._send(Request(method, stream.ispb, pull, stream.accept, stream.key), copies=copies)

    @precondition(lambda self: any(s.replay for s in self.model.live()))
    @rule(i=st.integers(0, 7), accept=READ_ACCEPTS)
    @step
    def replay(self, i: int, accept: str | None) -> None:
        """Use the id before the latest one while the latest is unused: a replay (a batch
        of several asked for again as one message is a 406)."""
        stream = pick([s for s in self.model.live() if s.replay], i)
        assert stream.replay is not None
        self._request_on(stream, "GET", stream.replay, accept)

    @precondition(lambda self: any(stale_ids(s) for s in self.model.streams))
    @rule(i=st.integers(0, 7), j=st.integers(0, 7), delete=st.booleans(), closed=st.booleans())
    @step
    def use_superseded(self, i: int, j: int, delete: bool, closed: bool) -> None:
        """An id that is neither the latest nor replayable, or one of a closed stream: 410."""
        candidates = [s for s in self.model.streams if stale_ids(s)]
        chosen = [s for s in candidates if (s.state != "open") == closed]
        stream = pick(chosen or candidates, i)
        pull = pick(stale_ids(stream), j)
        reply = self._request_on(stream, "DELETE" if delete else "GET", pull)
        assert reply.status == (200 if delete and pull == stream.closed_by else 410)

    @precondition(lambda self: self.model.streams)
    @rule(i=st.integers(0, 7), delete=st.booleans(), unknown=st.booleans())
    @step
    def use_foreign_id(self, i: int, delete: bool, unknown: bool) -> None:
        """A stream's id under the other ISPB, or an id never issued: 404, nothing changes."""
        method = "DELETE" if delete else "GET"
        stream = pick(self.model.streams, i)
        if unknown:
            reply = self._send(Request(method, stream.ispb, UNKNOWN_ID, stream.accept))
        else:
            other = next(ispb for ispb in ISPBS if ispb != stream.ispb)
            reply = self._send(Request(method, other, stream.current, stream.accept, stream.key))
        assert reply.status == 404

    @precondition(lambda self: self.model.live())
    @rule(i=st.integers(0, 7))
    @step
    def delete_current(self, i: int) -> None:
        """DELETE with the latest Pull-Next: confirms its batch, closes the stream."""
        stream = pick(self.model.live(), i)
        self._request_on(stream, "DELETE", stream.current)

    @precondition(lambda self: any(s.replay for s in self.model.live()))
    @rule(i=st.integers(0, 7))
    @step
    def delete_previous(self, i: int) -> None:
        """DELETE with the id before an unconfirmed batch: the batch goes back to the queue."""
        stream = pick([s for s in self.model.live() if s.replay], i)
        assert stream.replay is not None
        held = list(stream.batch)
        self._request_on(stream, "DELETE", stream.replay)
        assert all(self.model.messages[m].state == "queued" for m in held)

    @precondition(lambda self: any(not s.idle for s in self.model.live()))
    @rule(i=st.integers(0, 7), probe=st.booleans())
    @step
    def let_expire(self, i: int, probe: bool) -> None:
        """A stream gets no request for the idle window: the server expires it (the
        sweeper, or the next request on its ISPB that looks), its ids answer 410 and its
        unconfirmed batch is back in the queue."""
        stream = pick([s for s in self.model.live() if not s.idle], i)
        held = [] if stream.confirmed else list(stream.batch)
        # Advance this stream's clock by the window (see the module docstring).
        self.db.execute(
            "UPDATE pix_stream SET last_seen_at = last_seen_at - make_interval(secs => %s)"
            " WHERE id = %s",
            (IDLE, stream.db_id),
        )
        stream.idle, stream.last_seen = True, None
        if self.sweeper:

            def closed() -> bool:
                sql = "SELECT closed_at IS NOT NULL FROM pix_stream WHERE id = %s"
                return bool(self.db.execute(sql, (stream.db_id,)).fetchone()[0])

            wait_for(closed, timeout=EXPIRY_DEADLINE, what=f"stream {stream.key} to expire")
            self._sync(snapshot(self.db))
            assert self.model.streams[stream.key].state == "expired"
        elif not probe:
            return  # left idle: a later start, claim or request on it expires it
        # Its ids answer 410 (the first request also expires it, without a sweeper).
        stream = self.model.streams[stream.key]
        for pull in [stream.current, stream.replay]:
            if pull is not None:
                assert self._request_on(stream, "GET", pull).status == 410
        assert self._request_on(stream, "DELETE", stream.current).status == 410
        assert self.model.streams[stream.key].state == "expired"
        assert all(self.model.messages[m].state == "queued" for m in held)

    @invariant()
    def database_matches_model(self) -> None:
        healthy, self.healthy = self.healthy, False
        self._sync(snapshot(self.db))
        self.healthy = healthy

    # -- the final drain ----------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.healthy:
                self._drain()
        finally:
            self.http.close()

    def _drain(self) -> None:
        """Close every stream, read each ISPB dry with a fresh stream, then check that
        every message was confirmed exactly once and redelivered only as the model says."""
        for stream in self.model.live():
            self._request_on(stream, "DELETE", stream.current)
        for ispb in ISPBS:
            if not self.model.queued(ispb):
                continue  # the invariant already compared this ISPB's queue with the table
            reply = self._send(Request("GET", ispb, None, MULTIPART))
            key = len(self.model.streams) - 1
            for _ in range(len(self.model.messages) // MAX_BATCH + 2):
                if reply.status == 204:
                    break
                reply = self._request_on(
                    self.model.streams[key], "GET", self.model.streams[key].current
                )
            assert reply.status == 204, "the drain did not reach the end of the queue"
            self._request_on(self.model.streams[key], "DELETE", self.model.streams[key].current)
        self._sync(snapshot(self.db))
        for message in self.model.messages.values():
            assert message.state == "confirmed" and message.confirmations == 1, message
            assert message.deliveries == 1 + message.requeues, message


MODEL_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    database=None,  # no .hypothesis directory in the repository; failures print a blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture
def make_machine(
    start_server: Callable[..., Any], db: psycopg.Connection
) -> Callable[[str], type[ProtocolMachine]]:
    """A machine class bound to a fresh server: "sweeper" expires idle streams every
    0.2 s, "lazy" has no sweeper (only requests expire streams)."""

    def make(expiry: str) -> type[ProtocolMachine]:
        sweep = {"sweeper": 0.2, "lazy": 86400}[expiry]
        server = start_server(**{**SERVER_SETTINGS, "SWEEP_SECONDS": sweep})

        class Machine(ProtocolMachine):
            base = server.base
            sweeper = expiry == "sweeper"

        Machine.db = db
        return Machine

    return make


@pytest.mark.parametrize("expiry", ["sweeper", "lazy"])
def test_protocol_model(make_machine: Callable[[str], type[ProtocolMachine]], expiry: str) -> None:
    run_state_machine_as_test(make_machine(expiry), settings=MODEL_SETTINGS)


A, B = ISPBS
# One fixed sequence through every transition, so that each run covers them all
# whatever the random examples draw (message numbers are in insertion order).
WALK: list[tuple[str, dict[str, Any]]] = [
    ("seed", {"first": 12, "second": 3}),  # A: m1..m12, B: m13..m15
    ("start", {"ispb": A, "accept": MULTIPART}),  # s0 gets m1..m10
    ("start", {"ispb": A, "accept": None}),  # s1 gets m11
    ("continue_stream", {"i": 0, "accept": SAME}),  # s0 confirms m1..m10, gets m12
    ("repeat_concurrently", {"i": 0, "j": 1, "delete": False, "copies": 3}),  # m12 x3 at once
    ("retry", {"i": 0}),  # s0 repeats: the same m12 answer
    ("continue_stream", {"i": 0, "accept": SAME}),  # s0 confirms m12, 204
    ("use_superseded", {"i": 0, "j": 0, "delete": False, "closed": False}),  # 410
    ("continue_stream", {"i": 1, "accept": SAME}),  # s1 confirms m11, 204
    ("insert", {"ispb": A, "n": 5}),  # m16..m20
    ("repeat_concurrently", {"i": 1, "j": 0, "delete": False, "copies": 3}),  # s1 gets m16 x3
    ("delete_previous", {"i": 0}),  # s1 closed, m16 back in the queue
    ("retry", {"i": 1}),  # the same DELETE again: 200 again, and nothing changes
    ("continue_stream", {"i": 0, "accept": SAME}),  # s0 gets m16..m20
    ("replay", {"i": 0, "accept": "application/json"}),  # five as one message: 406
    ("replay", {"i": 0, "accept": SAME}),  # the same five again
    ("let_expire", {"i": 0, "probe": False}),  # s0 expires (lazily: at the next start)
    ("start", {"ispb": A, "accept": MULTIPART}),  # s2 gets m16..m20 again
    ("start_beyond_the_limit", {"ispb": A, "accept": None}),  # s3..s7, then 429
    ("use_foreign_id", {"i": 0, "delete": False, "unknown": False}),  # 404
    ("use_foreign_id", {"i": 0, "delete": True, "unknown": True}),  # 404
    ("start", {"ispb": B, "accept": "*/*"}),  # s8 gets m13
    ("let_expire", {"i": 6, "probe": True}),  # s8 expires, m13 back; its ids 410
    ("repeat_concurrently", {"i": 2, "j": 0, "delete": True, "copies": 2}),  # s2 confirms, closes
    ("insert", {"ispb": A, "n": 2}),  # m21, m22
    ("continue_stream", {"i": 0, "accept": SAME}),  # s3 gets m21
    ("let_expire", {"i": 0, "probe": False}),  # s3 expires (lazily: at the next claim)
    ("continue_stream", {"i": 1, "accept": SAME}),  # another stream gets m21 again
    ("replay", {"i": 0, "accept": MULTIPART}),  # and repeats it, as an array of one
    ("continue_stream", {"i": 1, "accept": MULTIPART}),  # a single stream gets m22, in an array
]


@pytest.mark.parametrize("expiry", ["sweeper", "lazy"])
def test_scripted_walk(make_machine: Callable[[str], type[ProtocolMachine]], expiry: str) -> None:
    machine = make_machine(expiry)()
    machine.database_matches_model()
    for name, arguments in WALK:
        getattr(machine, name)(**arguments)
        machine.database_matches_model()
    requeued = {m.id: m.requeues for m in machine.model.messages.values() if m.requeues}
    assert requeued == {13: 1, 16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 21: 1}
    machine.teardown()
    assert machine.healthy
