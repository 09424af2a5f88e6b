"""What the operators' console shows and does, between its views (api/console.py) and store.py.

Every figure comes from PostgreSQL through an index (see the console queries in
sql/queries.sql), so any process of any host answers the same, and a console
left open costs a few indexed queries per refresh, never a scan of the history.

Liveness: each process writes a heartbeat row (pix_process) from its sweeper
thread every PIXSTREAM_SWEEP_SECONDS (with ±50 % jitter). A process is alive
while its row is younger than three sweep periods (twice the longest jittered
period, plus slack); a host is alive while one of its processes is. The same
thread computes the backlog gauges of /metrics, so a scrape never runs a query.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from psycopg_pool import ConnectionPool

from pixstream import db, identity, metrics, store
from pixstream.listener import Listener
from pixstream.streams import StreamService

log = logging.getLogger(__name__)

# The overview's chart: the last five minutes, in ten-second buckets.
WINDOW_SECONDS = 300
BUCKET_SECONDS = 10
# The institutions' "last hour" columns.
RECENT_SECONDS = 3600
# Closed streams shown on an institution's page.
RECENT_CLOSED = 20
# A figure computed for one refresh serves every other within this (per process).
OVERVIEW_CACHE_SECONDS = 2.0
# A process is alive while its heartbeat is younger than this many sweep periods.
ALIVE_PERIODS = 3


@dataclass(frozen=True, slots=True)
class Institution:
    """One ISPB's row of the institutions table."""

    ispb: str
    queued: int = 0
    in_flight: int = 0
    oldest_age: float | None = None  # seconds; the oldest unconfirmed message
    oldest_queued_age: float | None = None
    open_streams: int = 0
    last_request: datetime | None = None
    delivered_hour: int = 0
    given_back_hour: int = 0  # redeliveries owed: batches returned to the queue

    @property
    def backlog(self) -> int:
        return self.queued + self.in_flight


@dataclass(frozen=True, slots=True)
class Host:
    """One host, as its processes' heartbeats describe it."""

    name: str
    processes: list[store.ProcessRow]
    alive_after: float

    @property
    def live(self) -> list[store.ProcessRow]:
        return [p for p in self.processes if p.silent_for < self.alive_after]

    @property
    def alive(self) -> bool:
        return bool(self.live)

    @property
    def listener(self) -> str:
        """``listening`` (all live processes), ``partial``, ``down``; ``silent``: no heartbeat."""
        live = self.live
        if not live:
            return "silent"
        connected = sum(p.listener_connected for p in live)
        return "listening" if connected == len(live) else "partial" if connected else "down"

    @property
    def silent_for(self) -> float:
        return min(p.silent_for for p in self.processes)


@dataclass(frozen=True, slots=True)
class Overview:
    """The console's first page."""

    backlog: int
    oldest_age: float | None
    open_streams: int
    ispbs_streaming: int
    ispbs_at_limit: int
    stream_limit: int  # per ISPB
    rate_429: float  # per second, all live processes
    rate_503: float
    hosts: list[Host]
    # Per second, oldest bucket first: (bucket start, seconds ago; inserted, delivered, confirmed).
    series: list[tuple[int, float, float, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InstitutionPage:
    institution: Institution
    open_streams: list[store.StreamInfo]
    closed_streams: list[store.StreamInfo]


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else max(0.0, (now - then).total_seconds())


def _older(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _newer(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


class ConsoleService:
    """Read the service's state for people; close streams and revoke credentials for them."""

    def __init__(
        self,
        pool: ConnectionPool,
        streams: StreamService,
        *,
        sweep_seconds: float,
        top_ispbs: int,
        stream_limit: int,
    ) -> None:
        self._pool = pool
        self._streams = streams
        self._alive_after = ALIVE_PERIODS * sweep_seconds
        self._top = top_ispbs
        self._stream_limit = stream_limit
        self._started_at = datetime.now(UTC)
        self._last_beat: tuple[float, int, int] | None = None  # (monotonic, 429s, 503s)
        self._exported: set[str] = set()  # ISPBs with a labelled gauge
        self._cache_lock = threading.Lock()
        self._cached: tuple[float, Overview] | None = None

    # -- the sweeper's part: heartbeat and gauges --------------------------------------

    def heartbeat(self, listener: Listener) -> None:
        """Write this process's row: alive now, listening or not, refusals per second."""
        now = time.monotonic()
        refused = metrics.local_refusals()
        rates = (0.0, 0.0)
        if self._last_beat is not None:
            elapsed = max(0.001, now - self._last_beat[0])
            rates = (
                (refused[0] - self._last_beat[1]) / elapsed,
                (refused[1] - self._last_beat[2]) / elapsed,
            )
        with db.transaction(self._pool) as conn:
            store.heartbeat(
                conn,
                id=identity.process_id(),
                host=identity.host(),
                pid=os.getpid(),
                started_at=self._started_at,
                listener_connected=listener.connected,
                listener_reconnects=int(metrics.local_value(metrics.LISTENER_RECONNECTS)),
                waiting=max(0, int(metrics.local_value(metrics.WAITING))),
                rate_429=rates[0],
                rate_503=rates[1],
            )
        self._last_beat = (now, *refused)

    def refresh_gauges(self) -> None:
        """Set the backlog gauges from the queued index and the open streams' batches."""
        rows = self.institutions(activity=False)
        metrics.BACKLOG.set(sum(i.backlog for i in rows))
        ages = [i.oldest_age for i in rows if i.oldest_age is not None]
        metrics.OLDEST_UNCONFIRMED.set(max(ages, default=0.0))
        top_backlog = sorted((i for i in rows if i.backlog), key=lambda i: -i.backlog)[: self._top]
        top_oldest = sorted(
            (i for i in rows if i.oldest_age is not None), key=lambda i: -(i.oldest_age or 0)
        )[: self._top]
        exported = {i.ispb for i in top_backlog} | {i.ispb for i in top_oldest}
        by_ispb = {i.ispb: i for i in rows}
        # An ISPB that left the top keeps its series at 0, not at a stale value.
        for ispb in exported | self._exported:
            row = by_ispb.get(ispb)
            metrics.ISPB_BACKLOG.labels(ispb).set(row.backlog if row else 0)
            metrics.ISPB_OLDEST_UNCONFIRMED.labels(ispb).set((row and row.oldest_age) or 0.0)
        self._exported = exported
        metrics.GAUGES_UPDATED.set(time.time())

    # -- reads --------------------------------------------------------------------------

    def institutions(self, *, activity: bool = True) -> list[Institution]:
        """Every ISPB with a queue, a batch in flight, an open stream or (``activity``)
        a delivery in the last hour, by ISPB."""
        with db.transaction(self._pool) as conn:
            queued = store.queued_by_ispb(conn)
            in_flight = store.in_flight_by_ispb(conn)
            streams = store.open_streams_by_ispb(conn)
            recent = store.recent_activity_by_ispb(conn, RECENT_SECONDS) if activity else []
        rows: dict[str, _Row] = {}
        for ispb, count, oldest in queued:
            row = rows.setdefault(ispb, _Row())
            row.queued, row.oldest_queued, row.oldest = count, oldest, oldest
        for ispb, count, oldest in in_flight:
            row = rows.setdefault(ispb, _Row())
            row.in_flight, row.oldest = count, _older(row.oldest, oldest)
        for ispb, count, last in streams:
            row = rows.setdefault(ispb, _Row())
            row.open_streams, row.last_request = count, last
        for ispb, delivered, given_back, last in recent:
            row = rows.setdefault(ispb, _Row())
            row.delivered_hour, row.given_back_hour = delivered, given_back
            row.last_request = _newer(row.last_request, last)
        now = datetime.now(UTC)
        return [row.institution(ispb, now) for ispb, row in sorted(rows.items())]

    def overview(self) -> Overview:
        """The first page's figures; computed at most every OVERVIEW_CACHE_SECONDS per process."""
        with self._cache_lock:
            if self._cached and time.monotonic() - self._cached[0] < OVERVIEW_CACHE_SECONDS:
                return self._cached[1]
        overview = self._overview()
        with self._cache_lock:
            self._cached = (time.monotonic(), overview)
        return overview

    def _overview(self) -> Overview:
        rows = self.institutions(activity=False)
        with db.transaction(self._pool) as conn:
            inserted = store.inserted_per_bucket(conn, WINDOW_SECONDS, BUCKET_SECONDS)
            pulls = store.pulls_per_bucket(conn, WINDOW_SECONDS, BUCKET_SECONDS)
            processes = store.list_processes(conn)
        series = []
        # Buckets are counted back from now, so the newest (0) is a full one too.
        for ago in range(WINDOW_SECONDS // BUCKET_SECONDS - 1, -1, -1):
            delivered, confirmed = pulls.get(ago, (0, 0))
            series.append(((ago + 1) * BUCKET_SECONDS, inserted.get(ago, 0) / BUCKET_SECONDS,
                           delivered / BUCKET_SECONDS, confirmed / BUCKET_SECONDS))  # fmt: skip
        hosts = self._hosts(processes)
        live = [p for h in hosts for p in h.live]
        ages = [i.oldest_age for i in rows if i.oldest_age is not None]
        return Overview(
            backlog=sum(i.backlog for i in rows),
            oldest_age=max(ages) if ages else None,
            open_streams=sum(i.open_streams for i in rows),
            ispbs_streaming=sum(1 for i in rows if i.open_streams),
            ispbs_at_limit=sum(1 for i in rows if i.open_streams >= self._stream_limit),
            stream_limit=self._stream_limit,
            rate_429=sum(p.rate_429 for p in live),
            rate_503=sum(p.rate_503 for p in live),
            hosts=hosts,
            series=series,
        )

    def _hosts(self, processes: Iterable[store.ProcessRow]) -> list[Host]:
        by_host: dict[str, list[store.ProcessRow]] = {}
        for process in processes:
            by_host.setdefault(process.host, []).append(process)
        return [Host(name, rows, self._alive_after) for name, rows in sorted(by_host.items())]

    def institution(self, ispb: str) -> InstitutionPage:
        """One ISPB: its row, open streams and latest closed streams."""
        with db.transaction(self._pool) as conn:
            open_streams = store.open_streams_of_ispb(conn, ispb)
            closed = store.closed_streams_of_ispb(conn, ispb, RECENT_CLOSED)
        rows = {i.ispb: i for i in self.institutions()}
        return InstitutionPage(rows.get(ispb, Institution(ispb)), open_streams, closed)

    # -- actions ------------------------------------------------------------------------

    def close_stream(self, ispb: str, stream_id: int, actor: str) -> int | None:
        """Close an open stream of ``ispb``, its batch back to the queue; None if not open."""
        released = self._streams.close_by_admin(ispb, stream_id, actor=actor)
        outcome = (
            "it was not open" if released is None else f"{released} message(s) back to the queue"
        )
        log.info(
            "console: %s closed stream %s of ISPB %s: %s", actor, stream_id, ispb, outcome,
            extra={"event": "console_close", "actor": actor, "ispb": ispb, "stream": stream_id},
        )  # fmt: skip
        with self._cache_lock:
            self._cached = None
        return released


@dataclass(slots=True)
class _Row:
    """An Institution being gathered from several queries."""

    queued: int = 0
    in_flight: int = 0
    oldest: datetime | None = None
    oldest_queued: datetime | None = None
    open_streams: int = 0
    last_request: datetime | None = None
    delivered_hour: int = 0
    given_back_hour: int = 0

    def institution(self, ispb: str, now: datetime) -> Institution:
        return Institution(
            ispb, self.queued, self.in_flight, _age(now, self.oldest),
            _age(now, self.oldest_queued), self.open_streams, self.last_request,
            self.delivered_hour, self.given_back_hour,
        )  # fmt: skip
