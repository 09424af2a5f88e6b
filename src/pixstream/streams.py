"""The collection protocol (docs/protocol.md), free of HTTP and of SQL.

A stream is a chain of pulls. Each answer hands out the next pull id as
``Pull-Next``; the batch delivered with it stays bound to it until the client
uses that id again (GET or DELETE), which confirms it. Only the stream's
current pull can hold an unconfirmed batch, so expiry and DELETE give back at
most one batch. A repeat of the request that produced the current pull
(``replay_pull``) gets the same answer; any older id is superseded (410).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import string
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from pixstream import db, identity, metrics, store
from pixstream.errors import (
    Conflict,
    DatabaseUnavailable,
    IdempotencyKeyUsed,
    Overloaded,
    RateLimited,
    StreamGone,
    StreamNotFound,
    TooManyStreams,
)
from pixstream.limits import (
    READ,
    START,
    WOKEN,
    Admission,
    Flooded,
    Gate,
    GateBusy,
    Shed,
    SlotTimeout,
    Ticket,
    TokenBucket,
    WaiterCap,
    retry_after_seconds,
)
from pixstream.listener import STREAMS_CHANNEL, Listener, Mark, Wakeup
from pixstream.quiet import Quiet, QuietPulls, Touches

log = logging.getLogger(__name__)
events = logging.getLogger("pixstream.events")

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 25  # 36**25 > 2**128: every bit of the random number shows
# An answer is due by the end of the long-poll window plus this, even when the
# database stalls during a wake-up's claim or the end-of-window re-check.
_ANSWER_GRACE = 1.0


def new_pull_id() -> str:
    """Return a fresh, unguessable interationId: 128 random bits in base 36."""
    number = int.from_bytes(secrets.token_bytes(16))
    symbols = []
    for _ in range(_ID_LENGTH):
        number, digit = divmod(number, 36)
        symbols.append(_ID_ALPHABET[digit])
    return "".join(symbols)


PULL_ID_PATTERN = "[a-z0-9]{12,64}"  # what any id this service issues looks like


def _event(name: str, ispb: str, stream_id: int, **fields: Any) -> None:
    """Log one stream event as a structured line (JSON with PIXSTREAM_LOG_FORMAT=json)."""
    details = "".join(f" {key}={value}" for key, value in fields.items())
    events.info(
        "stream %s %s ispb=%s%s", stream_id, name, ispb, details,
        extra={"event": name, "ispb": ispb, "stream": stream_id, **fields},
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Delivery:
    """One answer: the batch (empty means 204) and the id to follow next.

    ``quiet_stream`` is set on an empty answer known to leave its stream quiet
    (quiet.py): ``pull_next`` current and confirmed, no batch, no replay.
    """

    pull_next: str
    documents: list[str]
    quiet_stream: int | None = dataclasses.field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Settings:
    long_poll_seconds: float
    idle_seconds: float
    max_streams: int
    max_batch: int
    # Abuse limits, per process (limits.py).
    rate_per_ispb: float = 1000
    rate_burst: int = 1000
    max_requests_per_id: int = 16
    max_waiting: int = 5000
    # Load shedding (limits.Admission): the pool's size, and the expected wait
    # for a connection beyond which a start is refused (reads: see __init__).
    pool_size: int = 10
    shed_wait_seconds: float = 1.0
    # One long poll in this many on an idle stream claims; the others wait at once (quiet.py).
    idle_claim_every: int = 5
    # Confirmed messages, and closed streams with their pulls, are removed this long after.
    retention_seconds: float = 168 * 3600

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        return cls(
            long_poll_seconds=config["LONG_POLL_SECONDS"],
            idle_seconds=config["STREAM_IDLE_SECONDS"],
            max_streams=config["MAX_STREAMS_PER_ISPB"],
            max_batch=config["MAX_BATCH"],
            rate_per_ispb=config["RATE_PER_ISPB"],
            rate_burst=config["RATE_BURST"],
            max_requests_per_id=config["MAX_REQUESTS_PER_ID"],
            max_waiting=config["MAX_WAITING"],
            pool_size=config["POOL_SIZE"],
            shed_wait_seconds=config["SHED_WAIT_SECONDS"],
            idle_claim_every=config["IDLE_CLAIM_EVERY"],
            retention_seconds=config["RETENTION_HOURS"] * 3600,
        )


class StreamService:
    """Open, read, close and expire streams; wait for messages without polling.

    Every request first passes the abuse limits of this process: the ISPB's
    rate (429), then, for an id, its gate: at most ``max_requests_per_id``
    outstanding (409) and one at a time inside a transaction, the others
    waiting without a connection; a long poll waits only while the process
    holds fewer than ``max_waiting`` (503). Connections are lent by priority
    (woken long polls, reads, starts), and a start that would wait too long
    for one is refused at once (503; limits.Admission).
    """

    def __init__(self, pool: ConnectionPool, listener: Listener, settings: Settings) -> None:
        self._pool = pool
        self._listener = listener
        self.settings = settings
        self._rate = TokenBucket(settings.rate_per_ispb, settings.rate_burst)
        self._ids = Gate(settings.max_requests_per_id)
        # Starts of one ISPB serialise on its advisory lock anyway: queue them
        # here instead, so that they hold one connection, not one each.
        self._starts = Gate(None)
        self._waiters = WaiterCap(settings.max_waiting, window=settings.long_poll_seconds)
        # Starts are refused beyond the configured wait; reads and closes,
        # which deliver and confirm, are never refused: they queue ahead.
        shed_wait = settings.shed_wait_seconds
        self._admission = Admission(
            settings.pool_size,
            shed_after={START: shed_wait},
        )
        self._quiet = QuietPulls(
            claim_every=settings.idle_claim_every, capacity=2 * settings.max_waiting
        )
        self._touches = Touches()
        listener.on_notify(STREAMS_CHANNEL, self._quiet.closed)
        listener.on_scan(self._rescan_trusted)
        self._purged_up_to = 0  # where the retention's walk of pix_message goes on

    def start(self, ispb: str, batch_size: int, *, idempotency_key: str | None = None) -> Delivery:
        """Open a stream and read from it (long poll).

        With ``idempotency_key`` a repeat of the start opens no second stream:
        it gets the first start's answer (see ``_start_keyed``).
        """
        self._limit_rate(ispb)
        self._limit_waiters()
        self._shed(START)
        if idempotency_key is not None:
            return self._start_keyed(ispb, idempotency_key, batch_size)
        with self._starts.admit(ispb) as ticket:
            return self._read(ispb, None, batch_size, ticket)

    def _start_keyed(self, ispb: str, key: str, batch_size: int) -> Delivery:
        """A start with an Idempotency-Key: a read of the first pull of the key's stream.

        The key's open stream is found, or opened with no batch, in a
        transaction of its own; then every copy of the start, the first one
        included, reads the stream's first pull id exactly as a GET of it
        would. So copies that overlap share one answer (they pass that id's
        gate, and in other processes its row lock), a later copy replays the
        answer that delivered a batch, or waits as the first did while nothing
        was delivered, and none opens a second stream or takes a second slot.
        Once the stream moved past that id (the client used a later Pull-Next),
        the first answer is gone and the key cannot be answered again: 409.
        """
        first_pull = self._find_or_open_keyed(ispb, key)
        with self._admit(first_pull) as ticket:
            try:
                return self._read(ispb, first_pull, batch_size, ticket)
            except StreamGone as exc:
                raise IdempotencyKeyUsed(
                    f"the stream of ISPB {ispb} opened with this Idempotency-Key already went "
                    "past its first answer (a later Pull-Next was used) or was just closed; "
                    "a start with a new key opens another stream"
                ) from exc

    def _find_or_open_keyed(self, ispb: str, key: str) -> str:
        """The first pull id of ``ispb``'s open stream started with ``key``; opened if none.

        Queued behind this process's other starts of the ISPB, like a start
        without a key (one connection for all of them, not one each). The
        wait and the transaction share one pool timeout: the long poll's
        window only starts after this.
        """
        deadline = time.monotonic() + self._pool.timeout
        with (
            self._starts.admit(ispb) as ticket,
            _turn(ticket, self._pool.timeout),
            self._slot(START, max(0.1, deadline - time.monotonic())),
            db.transaction(self._pool, timeout=max(0.1, deadline - time.monotonic())) as conn,
        ):
            store.lock_ispb(conn, ispb)
            self._expire(conn, ispb)
            # Looked up before counting: a repeat is no new stream, never a 429.
            found = store.find_keyed_stream(conn, ispb, key)
            stream = found or self._insert_stream(conn, ispb, key)
        if stream is None:
            raise self._too_many_streams(ispb)
        if found:
            _event("start_repeated", ispb, found[0])
        return stream[1]

    def _too_many_streams(self, ispb: str) -> TooManyStreams:
        metrics.STREAMS_REFUSED.inc()
        return TooManyStreams(
            f"ISPB {ispb} already has {self.settings.max_streams} open streams; "
            "close one (DELETE) or retry after an idle one expires",
            retry_after=max(1, round(self.settings.long_poll_seconds)),
        )

    def pull(self, ispb: str, pull_id: str, batch_size: int) -> Delivery:
        """Confirm the batch delivered with ``pull_id`` and read the next one (long poll)."""
        self._limit_rate(ispb)
        self._limit_waiters()
        with self._admit(pull_id) as ticket:
            return self._read(ispb, pull_id, batch_size, ticket)

    def close(self, ispb: str, pull_id: str) -> None:
        """Confirm the batch delivered with ``pull_id`` and close its stream.

        Closing through the id that preceded the current one means the client
        never saw the current batch: it goes back to the queue. Repeating a
        DELETE that closed the stream answers the same again (a client whose
        answer was lost must learn that its stream is closed, not that it is gone).
        """
        released = 0
        self._limit_rate(ispb)
        with (
            self._admit(pull_id) as ticket,
            _turn(ticket, self._pool.timeout),
            self._slot(READ, self._pool.timeout),
            db.transaction(self._pool) as conn,
        ):
            ticket.publish(None)  # a read overlapping this DELETE runs its own transaction
            self._quiet.forget(pull_id)
            stream = self._locked_stream(conn, ispb, pull_id)
            usable = pull_id in (stream.current_pull, stream.replay_pull)
            repeat = stream.close_reason == "deleted" and pull_id == stream.closed_by_pull
            if usable and stream.close_reason is None:
                if pull_id == stream.current_pull:
                    metrics.MESSAGES_CONFIRMED.inc(store.confirm_pull(conn, pull_id))
                else:
                    released = store.release_pull(conn, stream.current_pull)
                    if released:
                        store.notify_ispbs(conn, [ispb])
                store.close_stream(conn, stream.id, pull_id)
                store.notify_streams_closed(conn, [stream.id])
        if repeat:
            return
        if not usable or stream.close_reason is not None:
            raise StreamGone(f"stream id {pull_id} was superseded, closed or expired")
        metrics.STREAMS_CLOSED.inc()
        _event("closed", ispb, stream.id, requeued=released)
        if released:
            metrics.MESSAGES_REQUEUED.labels("deleted_unconfirmed").inc(released)
            _event("redelivery", ispb, stream.id, requeued=released, reason="deleted_unconfirmed")

    def close_by_admin(self, ispb: str, stream_id: int, *, actor: str) -> int | None:
        """Close an open stream for an administrator; the count of messages given back.

        The expiry path for one stream: its unconfirmed batch goes back to the
        queue and the ISPB's other collectors are woken to take it; its
        client's next request answers 410. None when the stream is not open.
        """
        with (
            self._slot(READ, self._pool.timeout),
            db.transaction(self._pool) as conn,
        ):
            closed = store.expire_stream(conn, ispb, stream_id)
            if closed is not None:
                if closed.released:
                    store.notify_ispbs(conn, [ispb])
                store.notify_streams_closed(conn, [stream_id])
        if closed is None:
            return None
        metrics.STREAMS_CLOSED.inc()
        _event("closed_by_admin", ispb, stream_id, requeued=closed.released, actor=actor)
        if closed.released:
            metrics.MESSAGES_REQUEUED.labels("closed_by_admin").inc(closed.released)
            _event(
                "redelivery", ispb, stream_id, requeued=closed.released, reason="closed_by_admin"
            )
        return closed.released

    def sweep(self) -> int:
        """Expire every idle stream now, handing its unconfirmed batch back."""
        with db.transaction(self._pool) as conn:
            expired = self._expire(conn, None)
            metrics.STREAMS_OPEN.set(store.count_all_open_streams(conn))
        return len(expired)

    def purge(self, *, batch: int = 1000, budget_seconds: float = 2.0) -> store.Purged:
        """Remove what the retention no longer keeps, in batches, for at most ``budget_seconds``.

        Each batch is a transaction of its own, under a lock that one process
        of the fleet holds at a time (the others skip their turn). A pass
        walks the confirmed messages in id order, then removes closed streams;
        the next call goes on where this one stopped. Unconfirmed messages and
        open streams are never removed.
        """
        retention = self.settings.retention_seconds
        total = store.Purged()
        deadline = time.monotonic() + budget_seconds
        while time.monotonic() < deadline:
            with db.transaction(self._pool) as conn:
                if not store.lock_retention(conn):
                    break
                purged, last = store.purge_confirmed_messages(
                    conn, retention, batch, self._purged_up_to
                )
                if last is None:  # the walk reached the retention's frontier
                    purged += store.purge_closed_streams(conn, retention, batch)
            self._purged_up_to = last or 0
            total += purged
            if last is None and purged.streams < batch:
                break
        for what, count in dataclasses.asdict(total).items():
            if count:
                metrics.PURGED.labels(what).inc(count)
        return total

    def _expire(self, conn: psycopg.Connection, ispb: str | None) -> list[store.ExpiredStream]:
        idle_seconds = self.settings.idle_seconds
        expired = store.expire_idle_streams(conn, idle_seconds=idle_seconds, ispb=ispb)
        if expired:
            store.notify_ispbs(conn, (e.ispb for e in expired if e.released))
            store.notify_streams_closed(conn, (e.id for e in expired))
            _record_expiry(expired)
        return expired

    def _limit_rate(self, ispb: str) -> None:
        wait = self._rate.take(ispb)
        if wait:
            metrics.REQUESTS_REFUSED.labels("rate").inc()
            rate = self.settings.rate_per_ispb
            raise RateLimited(
                f"ISPB {ispb} sent more than {rate:g} stream requests per second "
                f"(burst {self.settings.rate_burst}); slow down",
                retry_after=retry_after_seconds(wait),
            )

    def _limit_waiters(self) -> None:
        """Refuse a long poll before it holds anything while the process is at its cap."""
        if self._waiters.full():
            metrics.REQUESTS_REFUSED.labels("waiters").inc()
            raise Overloaded(
                "the server holds as many waiting requests as it can; "
                "repeat the request after Retry-After",
                retry_after=self._waiters.refused(),
            )

    def _shed(self, priority: int) -> None:
        """Refuse work at once if its priority has a bound it would exceed waiting (503)."""
        with self._shedding(priority):
            self._admission.check(priority)

    @contextmanager
    def _shedding(self, priority: int) -> Iterator[None]:
        try:
            yield
        except Shed as exc:
            metrics.REQUESTS_REFUSED.labels("shed_start" if priority == START else "shed").inc()
            raise Overloaded(
                "the server is saturated; repeat the request after Retry-After",
                retry_after=exc.retry_after,
            ) from exc

    @contextmanager
    def _slot(self, priority: int, timeout: float) -> Iterator[None]:
        """Hold one of the pool's connection slots (limits.Admission) for the block.

        Refused at once (503) when the wait would be too long for new work;
        after ``timeout`` without a slot, as when the pool has no connection.
        """
        metrics.POOL_WAITING.inc()
        waiting = True
        try:
            with self._shedding(priority), self._admission.slot(priority, timeout):
                metrics.POOL_WAITING.dec()
                waiting = False
                yield
        except SlotTimeout as exc:
            raise DatabaseUnavailable("no database connection could be had in time") from exc
        finally:
            if waiting:
                metrics.POOL_WAITING.dec()

    @contextmanager
    def _admit(self, pull_id: str) -> Iterator[Ticket]:
        try:
            with self._ids.admit(pull_id) as ticket:
                yield ticket
        except Flooded as exc:
            metrics.REQUESTS_REFUSED.labels("flood").inc()
            raise Conflict(
                f"too many requests are in progress on stream id {pull_id}; "
                "keep one request in flight per stream (a repeat after a timeout is fine)"
            ) from exc

    @staticmethod
    def _shared(ticket: Ticket | None) -> Delivery | None:
        """The batch an overlapping identical request just got: the same answer, no transaction."""
        shared = ticket.shared() if ticket is not None else None
        return shared if isinstance(shared, Delivery) else None

    def _read(
        self, ispb: str, pull_id: str | None, batch_size: int, ticket: Ticket | None = None
    ) -> Delivery:
        """One long poll. ``ticket`` admitted it on its id (on its ISPB for a start).

        While waiting, the request holds no connection and no turn of its id;
        a newer request on the id may release it, and it then answers now, as
        at the end of its window (its client, which retried, is gone).
        """
        batch_size = max(1, min(batch_size, self.settings.max_batch))
        window = self.settings.long_poll_seconds
        deadline = time.monotonic() + window
        # Subscribe before the first claim: an insert committed after that
        # claim found nothing sets the wakeup, so the wait below cannot miss it.
        with self._listener.subscribe(ispb) as wakeup:
            listening = self._listener.listening_generation()
            mark = self._listener.mark(ispb)
            with (
                self._quiet.trusted(pull_id, ispb, mark, wakeup)
                if pull_id is not None
                else nullcontext()
            ) as quiet:
                delivery = self._long_poll(
                    ispb, pull_id, batch_size, ticket, deadline, wakeup, listening, quiet
                )
        self._remember_quiet(ispb, delivery, mark, quiet)
        return delivery

    def _long_poll(
        self,
        ispb: str,
        pull_id: str | None,
        batch_size: int,
        ticket: Ticket | None,
        deadline: float,
        wakeup: Wakeup,
        listening: int | None,
        quiet: Quiet | None,
    ) -> Delivery:
        """Claim (unless ``quiet`` says the database would find nothing), then wait."""
        if quiet is not None and pull_id is not None:
            # The database would answer as last time: nothing, same id. Wait
            # at once; the last-seen time it would have written is owed.
            delivery = Delivery(pull_id, [], quiet.stream_id)
            self._touches.add(quiet.stream_id, pull_id, deadline)
            metrics.IDLE_CLAIMS_SKIPPED.inc()
        else:
            with _turn(ticket, self._queue_limit(deadline, first=True)):
                delivery = self._shared(ticket if pull_id else None) or self._attempt(
                    ispb, pull_id, batch_size, deadline,
                    answer_in=max(0.0, deadline - time.monotonic()),
                    priority=START if pull_id is None else READ,
                )  # fmt: skip
                if delivery.documents and pull_id is not None and ticket is not None:
                    ticket.publish(delivery)
        if delivery.documents or self._listener.closing:
            return delivery
        if pull_id is None:
            ticket = None  # nobody else knows the new stream's id: no turns to take
        if not self._waiters.try_enter():
            return delivery  # at the cap since admission: a 204 now is a valid answer
        metrics.WAITING.inc()
        try:
            with ticket.waiting(wakeup.set) if ticket else nullcontext():
                return self._wait(ispb, delivery, batch_size, deadline, wakeup, listening, ticket)
        finally:
            metrics.WAITING.dec()
            self._waiters.leave()

    def _rescan_trusted(self, conn: psycopg.Connection) -> None:
        """On a new LISTEN connection: wake the polls trusting a stream that changed meanwhile.

        Closes sent while nobody listened are lost. With this check in the
        listener's scan, a poll that skipped its claim may trust the scan as
        every waiter does, instead of claiming at its window's end (after a
        reconnect, that would be most of the process's waiters at once).
        """
        trusted = self._quiet.trusted_pulls()
        if trusted:
            for stream_id in store.streams_moved_on(conn, trusted):
                self._quiet.moved(stream_id)

    def _remember_quiet(
        self, ispb: str, delivery: Delivery, mark: Mark | None, quiet: Quiet | None
    ) -> None:
        """Let the next poll on an empty answer's id skip its claim, if nothing was heard since.

        ``mark`` was taken before the claim that found nothing (or, for a poll
        that skipped it, before the claim it trusted): a notification for the
        ISPB since then may mean messages. (Closes come by stream id, and
        QuietPulls remembers them.)
        """
        stream_id = delivery.quiet_stream
        if delivery.documents or stream_id is None or mark is None:
            return
        if self._listener.mark(ispb) != mark:
            return
        skipped = quiet.skipped + 1 if quiet is not None else 0
        until = time.monotonic() + self.settings.idle_seconds / 2
        self._quiet.remember(delivery.pull_next, Quiet(ispb, stream_id, mark, skipped, until))

    def flush_touches(self) -> int:
        """Write the last-seen times owed by polls that skipped their claim; how many streams.

        Written long before an expiry could read them (the sweep's idle window
        is far longer than the flush's period); if the write fails, they stay owed.
        """
        owed = self._touches.take()
        if not owed:
            return 0
        now = time.monotonic()
        try:
            with self._slot(READ, self._pool.timeout), db.transaction(self._pool) as conn:
                store.touch_quiet_streams(
                    conn, [(stream_id, pull_id, due - now) for stream_id, pull_id, due in owed]
                )
        except (DatabaseUnavailable, Overloaded):
            self._touches.give_back(owed)
            raise
        metrics.QUIET_TOUCHES.inc(len(owed))
        return len(owed)

    @property
    def touches_pending(self) -> threading.Event:
        """Set while last-seen times are owed (for the process's flushing thread)."""
        return self._touches.pending

    def _wait(
        self,
        ispb: str,
        delivery: Delivery,
        batch_size: int,
        deadline: float,
        wakeup: Wakeup,
        listening: int | None,
        ticket: Ticket | None,
    ) -> Delivery:
        """Wait for a message until ``deadline``; claim it (taking the id's turn) when woken."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break  # a claim that ended past the window was the last check
            woken = wakeup.wait(remaining)
            if self._listener.closing:
                break  # shutting down: answer 204 now, the stream stays valid
            if ticket is not None and ticket.released:
                break  # a newer request on this id is served; answer as at the window's end
            if not woken and self._listener.missed_nothing_since(listening):
                # Listened throughout, or the listener reconnected and its scan
                # woke every ISPB with queued rows (and every poll trusting a
                # stream closed meanwhile): the empty claim still stands.
                # Otherwise notifications may be lost: re-check once.
                break
            wakeup.clear()  # before the claim: a later insert must wake us again
            # On a wake-up, claim; at the end of a window in which the
            # listener reconnected, re-check once: notifications were lost.
            try:
                with _turn(ticket, self._time_limit(deadline)):
                    delivery = self._shared(ticket) or self._attempt(
                        ispb, delivery.pull_next, batch_size, deadline,
                        answer_in=max(0.0, deadline - time.monotonic()), priority=WOKEN,
                    )  # fmt: skip
                    if delivery.documents and ticket is not None:
                        ticket.publish(delivery)
            except (DatabaseUnavailable, Overloaded) as exc:
                # This request already holds a stream (it may have opened it):
                # a 503 now would lose its Pull-Next, and a retry would add
                # load. Answer 204 with the id it has, at the window's end; the
                # message waits for the next read. If the failed transaction
                # did commit, that id replays the batch it claimed.
                metrics.WAKEUP_CLAIM_FAILURES.inc()
                log.warning("claim after a wake-up failed for ISPB %s: %s", ispb, exc)
                delivery = dataclasses.replace(delivery, quiet_stream=None)  # state unknown
                if not woken:
                    break
                continue
            if delivery.documents:
                if woken:
                    metrics.WAKEUP_LATENCY.observe(time.monotonic() - wakeup.woken_at)
                break
            if not woken:
                break
        return delivery

    def _queue_limit(self, deadline: float, *, first: bool) -> float:
        """How long a long poll may queue (for its id's or ISPB's turn, for a slot).

        Half its transaction's time limit; but for its first claim, a long
        poll that holds nothing may queue for as long as its window leaves a
        transaction's worth of time: it may answer that late anyway. In a
        reconnect storm a request refused early only sends its client back
        at once (impatient clients ignore Retry-After), and every refusal
        costs the CPU that the admitted work needs.
        """
        limit = self._time_limit(deadline) / 2
        if first:
            limit = max(limit, deadline - time.monotonic() - self._pool.timeout)
        return limit

    def _time_limit(self, deadline: float) -> float:
        """How long one claim may take: never pushing the answer far past the window."""
        return min(self._pool.timeout, max(0.1, deadline + _ANSWER_GRACE - time.monotonic()))

    def _attempt(
        self,
        ispb: str,
        pull_id: str | None,
        batch_size: int,
        deadline: float,
        *,
        answer_in: float,
        priority: int,
    ) -> Delivery:
        """One transaction: open or lock the stream, confirm, claim, advance.

        ``deadline`` is the end of the request's window: the transaction ends
        by then plus the grace (``_time_limit``).
        """
        started = time.perf_counter()
        opened: Delivery | None = None  # a start's answer, once its transaction's body ran
        # Refusals are raised after the commit, so that the lazy expiry they
        # may have done (and its redeliveries) is kept.
        try:
            # The transaction's time limit counts from when it has a slot: one
            # begun with only a sliver left would hit its deadline under load,
            # and each such failure discards a connection the pool must make again.
            with (
                self._slot(priority, self._queue_limit(deadline, first=priority != WOKEN)),
                db.transaction(self._pool, timeout=self._time_limit(deadline)) as conn,
            ):
                if pull_id is None:
                    delivery = opened = self._open(conn, ispb, batch_size, answer_in)
                    if delivery is None:
                        refusal: Exception = self._too_many_streams(ispb)
                else:
                    delivery = self._continue(conn, ispb, pull_id, batch_size, answer_in)
                    if delivery is None:
                        refusal = StreamGone(
                            f"stream id {pull_id} was superseded, closed or expired"
                        )
        except DatabaseUnavailable:
            # The deadline or the connection failed during the COMMIT: it may have
            # landed. A start that answered 503 then would orphan its stream (a
            # repeated read needs no such care: its id replays what was committed).
            if opened is None or not self._landed(opened):
                raise
            log.warning("a start's commit outlived its deadline but landed; answering it")
            delivery = opened
        metrics.CLAIM_DURATION.observe(time.perf_counter() - started)
        if delivery is None:
            raise refusal
        return delivery

    def _landed(self, delivery: Delivery) -> bool:
        """Whether the stream a start's unanswered COMMIT was creating exists after all.

        It sees a COMMIT the server finished (its answer was lost or late); one
        the server is still running reads as not landed, like a failed check:
        the start then answers 503, and its stream, if it lands, expires unused.
        """
        try:
            with self._slot(WOKEN, self._pool.timeout), db.transaction(self._pool) as conn:
                stream = store.lock_stream(
                    conn, delivery.pull_next, idle_seconds=self.settings.idle_seconds
                )
        except (DatabaseUnavailable, Overloaded):
            return False
        return stream is not None

    def _open(
        self, conn: psycopg.Connection, ispb: str, batch_size: int, answer_in: float
    ) -> Delivery | None:
        """Open a stream and claim its first batch; None when the ISPB is at its limit."""
        store.lock_ispb(conn, ispb)
        self._expire(conn, ispb)
        opened = self._insert_stream(conn, ispb, None)
        if opened is None:
            return None
        stream_id, pull_id = opened
        return self._claim(conn, ispb, stream_id, pull_id, batch_size, answer_in)

    def _insert_stream(
        self, conn: psycopg.Connection, ispb: str, idempotency_key: str | None
    ) -> tuple[int, str] | None:
        """A new stream and its first pull id, holding the ISPB's lock; None at the limit."""
        if store.count_open_streams(conn, ispb) >= self.settings.max_streams:
            return None
        pull_id = new_pull_id()
        stream_id = store.insert_stream(
            conn, ispb, pull_id, idempotency_key=idempotency_key, opened_by=identity.process_id()
        )
        metrics.STREAMS_OPENED.inc()
        _event("opened", ispb, stream_id, **({"keyed": True} if idempotency_key else {}))
        return stream_id, pull_id

    def _continue(
        self, conn: psycopg.Connection, ispb: str, pull_id: str, batch_size: int, answer_in: float
    ) -> Delivery | None:
        stream = self._locked_stream(conn, ispb, pull_id)
        if stream.close_reason is not None:
            return None
        if pull_id == stream.replay_pull:
            # A repeat of the request that produced the current batch.
            store.touch_stream(conn, stream.id)
            return Delivery(stream.current_pull, store.batch_documents(conn, stream.current_pull))
        if pull_id != stream.current_pull:
            return None
        # Lazy expiry: batches abandoned by idle streams become claimable now.
        # The lock said whether the ISPB has any, so a read pays for it only then.
        if stream.idle_in_ispb:
            self._expire(conn, ispb)
        # The batch of pull_id is confirmed by the same statement that claims.
        return self._claim(conn, ispb, stream.id, pull_id, batch_size, answer_in)

    def _claim(
        self,
        conn: psycopg.Connection,
        ispb: str,
        stream_id: int,
        used_pull: str,
        batch_size: int,
        answer_in: float,
    ) -> Delivery:
        """Confirm and claim for a stream whose current pull ``used_pull`` was just used.

        One statement (a read's round trips are its cost): it confirms the
        batch of ``used_pull``, claims the next and moves the stream on. An
        empty claim dates the stream's last request to when its answer is due
        (``answer_in`` seconds on), since idleness counts from the end of the
        last response and that answer may come without another transaction.
        """
        next_pull = new_pull_id()
        read = store.confirm_claim_advance(
            conn, ispb, stream_id=stream_id, used=used_pull, pull=next_pull,
            limit=batch_size, answer_in=answer_in,
        )  # fmt: skip
        if read.confirmed:
            metrics.MESSAGES_CONFIRMED.inc(read.confirmed)
        claimed = read.claimed
        if not claimed.documents:
            return Delivery(used_pull, [], stream_id)
        size = len(claimed.documents)
        metrics.MESSAGES_DELIVERED.inc(size)
        if claimed.redelivered:
            metrics.MESSAGES_REDELIVERED.inc(claimed.redelivered)
            _event("redelivered", ispb, stream_id, messages=claimed.redelivered)
        return Delivery(next_pull, claimed.documents)

    def _locked_stream(self, conn: psycopg.Connection, ispb: str, pull_id: str) -> store.StreamRow:
        """Lock the stream behind ``pull_id``.

        Raises StreamNotFound for an id never issued, or issued to another ISPB.
        A stream found idle is expired on the spot, before the sweep gets to it.
        """
        stream = store.lock_stream(conn, pull_id, idle_seconds=self.settings.idle_seconds)
        if stream is None or stream.ispb != ispb:
            raise StreamNotFound(f"no stream of ISPB {ispb} has the id {pull_id}")
        if stream.close_reason is None and stream.idle:
            self._expire(conn, ispb)
            return dataclasses.replace(stream, close_reason="expired")
        return stream


@contextmanager
def _turn(ticket: Ticket | None, timeout: float) -> Iterator[None]:
    """Take ``ticket``'s turn on its id for a transaction; 503 if it does not come in time."""
    if ticket is None:
        yield
        return
    try:
        with ticket.exclusive(timeout):
            yield
    except GateBusy as exc:
        metrics.REQUESTS_REFUSED.labels("lock_timeout").inc()
        raise Overloaded(
            "the stream is busy with other requests; repeat this one after Retry-After",
            retry_after=1,
        ) from exc


def _record_expiry(expired: Iterable[store.ExpiredStream]) -> None:
    for stream in expired:
        metrics.STREAMS_EXPIRED.inc()
        _event("expired", stream.ispb, stream.id, requeued=stream.released)
        if stream.released:
            metrics.MESSAGES_REQUEUED.labels("expired").inc(stream.released)
