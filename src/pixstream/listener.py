"""One ``LISTEN pix_inserted`` connection per process, fanning wake-ups out to waiters.

A waiting request registers an Event for its ISPB and sleeps on it; it holds
no database connection and runs no query meanwhile. A notification only says
"look again": the database stays the truth, so a spurious or merged wake-up is
harmless, while a missed one would cost a whole long-poll window. Hence the
rules below: register before the first claim, clear before each re-claim, and
re-check whenever notifications may have been missed (on reconnect): at once
where messages are queued; elsewhere at the end of the window, unless the
reconnect's scan for queued messages has run.

The same connection also listens on ``pix_credentials`` (a credential was
created, revoked or changed; the payload is its id) and ``pix_stream_closed``
(a stream was closed or expired; the payload is its id), and hands those
payloads to the callbacks registered with ``on_notify``. Notifications sent
while nobody listened are lost: ``on_reconnect`` callbacks run on every new
connection, and ``on_scan`` callbacks in its wake-up scan, with the connection.

The thread must outlive anything short of its own killing (a BaseException):
without it the process silently falls back to one claim per window. Any
other exception is logged, counted and handled like a lost connection.

Only ``threading`` primitives are used: under gunicorn's gevent worker they are
monkey-patched into greenlet primitives, under the dev server they are threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import psycopg
from psycopg.conninfo import make_conninfo

from pixstream import db, metrics
from pixstream.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

CHANNEL = "pix_inserted"
CREDENTIALS_CHANNEL = "pix_credentials"
STREAMS_CHANNEL = "pix_stream_closed"  # payload: the id of a stream just closed or expired
_PROBE_DEADLINE = 5.0  # seconds for the liveness probe to answer

# TCP settings of the LISTEN connection, in libpq's names (db.py's pool uses
# gentler ones). This connection mostly waits to receive, and a peer gone
# without a FIN or RST (a half-open socket) never makes a read fail: keepalives
# find it after 2 s of silence and 3 unanswered probes a second apart, and
# tcp_user_timeout drops it once data sent (the probe's SELECT 1) has gone
# unacknowledged for 5 s, even where no gevent deadline applies. Worst case
# about 10 s, the probe interval; see "Wait" in docs/architecture.md.
TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 2,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 5000,  # ms
}
# PostgreSQL's own limit on this connection's statements (the probe and the
# wake-up scan), a little under their client-side deadline, as for the pool's
# connections (db.server_limits): a deadline only drops the connection, while
# the backend would go on running the statement; and without gevent (the dev
# server) there is no deadline at all, so this alone stops a scan stuck behind
# a lock. LISTEN and the wait for notifications are no long statements, so it
# never ends a quiet connection. idle_in_transaction_session_timeout does not
# apply: the connection is in autocommit and never holds a transaction open.
STATEMENT_TIMEOUT = db.server_limits(_PROBE_DEADLINE).statement  # seconds
# Set on each new connection: the TCP settings on the server's side of it too
# (a listener that vanished is dropped within seconds, instead of holding
# back the server's notification queue), and STATEMENT_TIMEOUT.
_SERVER_SETTINGS = (
    "SELECT set_config('tcp_keepalives_idle', '2', false),"
    " set_config('tcp_keepalives_interval', '1', false),"
    " set_config('tcp_keepalives_count', '3', false),"
    " set_config('tcp_user_timeout', '5000', false),"
    f" set_config('statement_timeout', '{round(STATEMENT_TIMEOUT * 1000)}', false)"
)
# Which of the waiting ISPBs have queued messages: one probe of the queued
# index (recipient_ispb, id) WHERE pull_id IS NULL per ISPB, however long its queue.
_QUEUED_ISPBS = """
    SELECT w.ispb FROM unnest(%s::text[]) AS w(ispb)
    WHERE EXISTS (
        SELECT FROM pix_message m WHERE m.recipient_ispb = w.ispb AND m.pull_id IS NULL
    )
"""


# What a waiter knows of its ISPB's notifications: the listener's connection
# generation and how many notifications for the ISPB it has handed out.
Mark = tuple[int, int]


class Wakeup:
    """What a waiting read sleeps on; remembers when it was last woken."""

    __slots__ = ("_event", "woken_at")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.woken_at = 0.0

    def set(self) -> None:
        self.woken_at = time.monotonic()
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def clear(self) -> None:
        self._event.clear()


class Listener:
    """Own the LISTEN connection of this process; reconnect with backoff when it dies."""

    def __init__(
        self,
        conninfo: str,
        *,
        probe_seconds: float = 10.0,
        max_backoff_seconds: float = 2.0,
    ) -> None:
        self._conninfo = conninfo
        self._probe_seconds = probe_seconds
        self._max_backoff = max_backoff_seconds
        self._waiters: defaultdict[str, set[Wakeup]] = defaultdict(set)
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._callbacks: dict[str, list[Callable[[str], None]]] = {
            CREDENTIALS_CHANNEL: [],
            STREAMS_CHANNEL: [],
        }
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._scan_hooks: list[Callable[[psycopg.Connection], None]] = []
        # Bumped on every (re)connection: a waiter that saw the same generation
        # connected before its claim and after its wait missed no notification.
        self.generation = 0
        # The generation whose wake-up scan (_wake_queued) completed: it found
        # every message its notifications may have missed, for every waiter.
        self._scanned = 0
        # Notifications handed out per ISPB (quiet.py): a mark that is unchanged
        # means no message of the ISPB was inserted or given back since.
        self._notified: defaultdict[str, int] = defaultdict(int)

    @property
    def connected(self) -> bool:
        """True while LISTEN is in force, i.e. wake-ups are being delivered."""
        return self._connected.is_set()

    def listening_generation(self) -> int | None:
        """The current connection's generation, or None while not listening."""
        return self.generation if self._connected.is_set() else None

    def mark(self, ispb: str) -> Mark | None:
        """Where ``ispb``'s notifications stand now; None while not listening.

        Two equal marks mean that the connection stayed up and no wake-up for
        the ISPB was handed out in between (a reconnect's scan counts as one).
        """
        if not self._connected.is_set():
            return None
        with self._lock:
            return (self.generation, self._notified.get(ispb, 0))

    def missed_nothing_since(self, mark: int | None) -> bool:
        """True when a waiter subscribed at ``mark`` (a listening_generation) lost no wake-up.

        Either the connection is the one it subscribed under, or a later one
        whose wake-up scan has run: that scan started after the waiter
        subscribed and woke it if its ISPB had queued messages. A waiter for
        which this is False must claim again before it answers 204.
        """
        if not self._connected.is_set():
            return False
        generation = self.generation
        return generation == mark or self._scanned == generation

    @property
    def closing(self) -> bool:
        """True once the process is shutting down: waiters should answer now."""
        return self._closing.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pixstream-listener", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        """Wake every waiter for the last time and stop listening."""
        self._closing.set()
        self._wake_all()

    @contextmanager
    def subscribe(self, ispb: str) -> Iterator[Wakeup]:
        """Yield a Wakeup that is set whenever ``ispb`` may have new messages.

        Enter this before the first claim: a commit landing between an empty
        claim and the wait then sets it, and the wait returns at once.
        """
        event = Wakeup()
        with self._lock:
            self._waiters[ispb].add(event)
        try:
            yield event
        finally:
            with self._lock:
                waiters = self._waiters.get(ispb)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[ispb]

    def on_notify(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call ``callback(payload)`` on the listener's thread for each notification on ``channel``.

        The channels are fixed (LISTEN runs once per connection, on the
        listener's own thread); ``pix_credentials`` and ``pix_stream_closed``
        take callbacks.
        A callback must be quick and must not block: it delays every wake-up.
        """
        if channel not in self._callbacks:
            raise ValueError(f"the listener does not listen on {channel!r} for callbacks")
        with self._lock:
            self._callbacks[channel].append(callback)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on every new LISTEN connection: notifications may have been lost."""
        with self._lock:
            self._reconnect_hooks.append(callback)

    def on_scan(self, callback: Callable[[psycopg.Connection], None]) -> None:
        """Call ``callback(conn)`` in every new connection's wake-up scan, with that connection.

        For what else waiters may have missed while nobody listened: it runs
        after LISTEN, under the scan's deadline, and must wake whom it
        concerns. If it raises, the scan counts as failed (waiters re-check).
        """
        with self._lock:
            self._scan_hooks.append(callback)

    def _dispatch(self, channel: str, payload: str) -> None:
        with self._lock:
            callbacks = list(self._callbacks.get(channel, ()))
        for callback in callbacks:
            try:
                callback(payload)
            except Exception:
                log.exception("notification callback failed on %s", channel)

    def _reconnected(self) -> None:
        with self._lock:
            hooks = list(self._reconnect_hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:
                log.exception("listener reconnect hook failed")

    def _wake(self, ispb: str) -> None:
        with self._lock:
            self._notified[ispb] += 1
            events = list(self._waiters.get(ispb, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [event for group in self._waiters.values() for event in group]
        for event in events:
            event.set()

    def _run(self) -> None:
        backoff = 0.05
        first = True
        while not self._closing.is_set():
            try:
                conninfo = make_conninfo(
                    self._conninfo,
                    connect_timeout=3,
                    fallback_application_name=db.application_name("pixstream-listener"),
                    **TCP_SETTINGS,
                )
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    conn.execute(_SERVER_SETTINGS)
                    # pix_inserted last: pg_stat_activity shows a backend's last
                    # statement, and operators (and the tests) find the listener by it.
                    conn.execute(f"LISTEN {CREDENTIALS_CHANNEL}")
                    conn.execute(f"LISTEN {STREAMS_CHANNEL}")
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.generation += 1
                    self._connected.set()
                    metrics.LISTENER_CONNECTED.set(1)
                    if not first:
                        metrics.LISTENER_RECONNECTS.inc()
                        log.info("listener reconnected")
                    first = False
                    backoff = 0.05
                    # Notifications sent while nobody listened are gone.
                    self._reconnected()
                    self._wake_queued(conn)
                    self._scanned = self.generation
                    self._listen(conn)
            except (psycopg.Error, DatabaseUnavailable) as exc:
                if not self._closing.is_set():
                    log.warning("listener connection lost: %s", exc)
            except Exception:
                # Anything else (a bug, a waiter or hook that raises) must not
                # end the thread: without it the process silently falls back
                # to one claim per window. The connection is closed on the way
                # out, and the next one wakes waiters as after a lost socket:
                # the notifications being handed out may not all have been.
                # (BaseException, e.g. GreenletExit at shutdown, still ends it.)
                log.exception("listener failed; reconnecting")
                metrics.LISTENER_ERRORS.inc()
            finally:
                self._connected.clear()
                metrics.LISTENER_CONNECTED.set(0)
            self._closing.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _wake_queued(self, conn: psycopg.Connection) -> None:
        """Wake the waiters of the ISPBs with queued messages: their notifications may be lost.

        Waking every waiter instead would send them all to the pool at once,
        just as the database is back (a herd of 503s). The query runs after
        LISTEN, over every ISPB waited on when it starts: a commit it does not
        see is notified, so once it has run (missed_nothing_since) the waiters
        left asleep need no re-check. If it fails, the connection is dropped
        and the next one scans again; meanwhile waiters re-check at their
        window's end.
        """
        with self._lock:
            ispbs = list(self._waiters)
            hooks = list(self._scan_hooks)
        with db.deadline(_PROBE_DEADLINE):
            queued = conn.execute(_QUEUED_ISPBS, (ispbs,)).fetchall() if ispbs else []
            for hook in hooks:
                hook(conn)
            # A no-op, so that pg_stat_activity shows the listener by its
            # last statement again (see _run).
            conn.execute(f"LISTEN {CHANNEL}")
        for (ispb,) in queued:
            self._wake(ispb)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._closing.is_set():
            # notifies() holds the connection's lock while suspended: close it
            # explicitly when a wake-up raises, so closing the connection cannot block.
            with closing(conn.notifies(timeout=self._probe_seconds)) as notifies:
                for notify in notifies:
                    if notify.channel == CHANNEL:
                        self._wake(notify.payload)
                    else:
                        self._dispatch(notify.channel, notify.payload)
            # A quiet channel says nothing about the connection: probe it, so a
            # dead socket (or a frozen server) is found within probe_seconds,
            # not at the next insert.
            with db.deadline(_PROBE_DEADLINE):
                conn.execute("SELECT 1")
