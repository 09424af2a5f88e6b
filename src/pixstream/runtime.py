"""Per-process resources: the pool, the listener, the sweeper, the stream and access services.

They are built by the app factory but started only after gunicorn has forked
the worker (by its post_worker_init hook, or on first use elsewhere): nothing
holding a socket or a thread crosses a fork.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flask import Flask, current_app
from psycopg_pool import ConnectionPool

from pixstream import db, metrics, migrate, store
from pixstream.errors import DatabaseUnavailable, Overloaded
from pixstream.listener import CHANNEL, Listener
from pixstream.streams import Settings, StreamService

if TYPE_CHECKING:
    from pixstream.access import AccessService
    from pixstream.console import ConsoleService

log = logging.getLogger(__name__)

EXTENSION = "pixstream"
# Longest delay before the last-seen times owed by idle polls are written.
TOUCH_PERIOD_SECONDS = 5.0
# The backlog gauges are computed after a sweep at most this often (or every
# sweep when sweeps are rarer): about a Prometheus scrape interval. Each
# computation reads the queued index of every ISPB, so not every second.
GAUGES_PERIOD_SECONDS = 15.0


class Runtime:
    """Everything one server process shares between its requests."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        location: str | None = None,
        pending_migrations: Sequence[str] = (),
    ) -> None:
        self.conninfo: str = config["DATABASE_URL"]
        # Where the data is, for people: "embedded PostgreSQL in <dir>" or
        # "DATABASE_URL host:port/db" (never a password).
        self.location = location or f"DATABASE_URL {db.server_and_database(self.conninfo)}"
        self._config = config
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pool: ConnectionPool | None = None
        self._listener: Listener | None = None
        self._sweeper: threading.Thread | None = None
        self._toucher: threading.Thread | None = None
        self._streams: StreamService | None = None
        self._access: AccessService | None = None
        self._console: ConsoleService | None = None
        # Migrations another session was applying when this process booted: not
        # ready until they are in the ledger (a thread takes them over if free).
        self._pending_migrations: list[str] = list(pending_migrations)
        self._schema_watch: threading.Thread | None = None
        self._gauges_due = 0.0  # time.monotonic() after which the gauges are recomputed

    @property
    def pool(self) -> ConnectionPool:
        """The process's connection pool, opened on first use."""
        with self._lock:
            if self._pool is None:
                self._pool = db.make_pool(
                    self.conninfo,
                    max_size=self._config["POOL_SIZE"],
                    timeout=self._config["POOL_TIMEOUT_SECONDS"],
                    lock_timeout=self._config["STREAM_LOCK_TIMEOUT_SECONDS"],
                )
                self._pool.open(wait=False)
            return self._pool

    @property
    def listener(self) -> Listener:
        """The process's LISTEN connection, started on first use."""
        with self._lock:
            if self._listener is None:
                self._listener = Listener(self.conninfo)
                self._listener.start()
            return self._listener

    @property
    def streams(self) -> StreamService:
        """The stream service; building it starts the pool, the listener and the sweeper.

        The sweeper starts here too, not only in start(), so that a process
        serving streams without start() (the dev server) still expires them.
        """
        if self._streams is None:
            config = self._config
            self._streams = StreamService(
                self.pool,
                self.listener,
                Settings.from_config(config),
            )
            self._start_sweeper()
        return self._streams

    @property
    def access(self) -> AccessService:
        """The credential service; building it starts the pool and the listener.

        Its cache is invalidated through the listener (channel pix_credentials).
        """
        if self._access is not None:  # every authenticated request comes here: no lock
            return self._access
        from pixstream.access import AccessService  # imports cryptography: only when used

        pool, listener = self.pool, self.listener
        with self._lock:
            if self._access is None:
                self._access = AccessService(
                    pool,
                    listener,
                    cache_seconds=self._config.get("CREDENTIAL_CACHE_SECONDS", 30.0),
                )
            return self._access

    @property
    def console(self) -> ConsoleService:
        """The console's service (built on the stream service: it starts the sweeper)."""
        if self._console is not None:
            return self._console
        from pixstream.console import ConsoleService

        pool, streams = self.pool, self.streams
        with self._lock:
            if self._console is None:
                self._console = ConsoleService(
                    pool,
                    streams,
                    sweep_seconds=self._config["SWEEP_SECONDS"],
                    top_ispbs=self._config["METRICS_TOP_ISPBS"],
                    stream_limit=self._config["MAX_STREAMS_PER_ISPB"],
                )
            return self._console

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is None:
                self._sweeper = threading.Thread(
                    target=self._sweep_forever, name="pixstream-sweeper", daemon=True
                )
                self._sweeper.start()
                self._toucher = threading.Thread(
                    target=self._touch_forever, name="pixstream-toucher", daemon=True
                )
                self._toucher.start()

    def _touch_forever(self) -> None:
        """Write, in one batch, the last-seen times idle polls owe (quiet.py).

        Sleeps on an event while nothing is owed, then gathers for a while:
        5 s (less with a short idle window), a small part of what separates
        the database's last-seen time from an expiry (the idle window minus
        the long poll), and enough to merge thousands of polls into one write.
        """
        streams = self.streams
        settings = streams.settings
        period = min(TOUCH_PERIOD_SECONDS, (settings.idle_seconds - settings.long_poll_seconds) / 4)
        while not self._stopping.is_set():
            streams.touches_pending.wait()
            self._stopping.wait(period)
            try:
                streams.flush_touches()
            except (DatabaseUnavailable, Overloaded) as exc:
                log.warning("last-seen times not written yet: %s", exc)
            except Exception:
                log.exception("writing last-seen times failed")

    def _sweep_forever(self) -> None:
        """Expire abandoned streams, even of ISPBs nobody reads any more; apply the retention."""
        period = self._config["SWEEP_SECONDS"]
        # The first heartbeat says whether the listener is up: give it a moment to be.
        self.listener.wait_connected(min(period, 2.0))
        self._observe()
        # Jitter keeps the workers of a fleet from sweeping in lockstep.
        while not self._stopping.wait(period * random.uniform(0.5, 1.5)):
            try:
                self.streams.sweep()
                self.streams.purge()
            except DatabaseUnavailable as exc:
                log.warning("sweep skipped: %s", exc)
            except Exception:
                log.exception("sweep failed")
            self._observe()

    def _observe(self) -> None:
        """Set the readiness gauge; write the heartbeat and the backlog gauges (console.py)."""
        try:
            metrics.READY.set(0 if self.readiness(1.0) else 1)
            if self._pending_migrations:
                return  # pix_process may not exist yet
            self.console.heartbeat(self.listener)
            if time.monotonic() >= self._gauges_due:
                self._gauges_due = time.monotonic() + GAUGES_PERIOD_SECONDS
                self.console.refresh_gauges()
        except (DatabaseUnavailable, Overloaded) as exc:
            log.warning("heartbeat and gauges skipped: %s", exc)
        except Exception:
            log.exception("heartbeat and gauges failed")

    def _watch_schema(self) -> None:
        """Start, once, the thread that waits for the pending migrations."""
        with self._lock:
            if self._pending_migrations and self._schema_watch is None:
                self._schema_watch = threading.Thread(
                    target=self._await_schema, name="pixstream-schema", daemon=True
                )
                self._schema_watch.start()

    def _await_schema(self) -> None:
        """Once a second: apply the pending migrations if the lock is free, else re-read the ledger.

        Whoever holds the lock (the release phase, usually) applies them; if it
        went away without doing so, this process does.
        """
        while self._pending_migrations and not self._stopping.wait(1.0):
            try:
                migrate.upgrade(self.conninfo, lock_wait=0)
                self._pending_migrations = []
            except migrate.LockBusy:
                try:
                    self._pending_migrations = migrate.pending(self.conninfo)
                except Exception as exc:
                    log.warning("schema check failed: %s", exc)
            except Exception:
                log.exception("migration failed; retrying")
        if not self._pending_migrations:
            log.info("schema current")

    def start(self) -> None:
        """Open the pool, start listening and sweeping now rather than on the first request."""
        self.pool  # noqa: B018 - the properties start what they return
        self.listener  # noqa: B018
        self._start_sweeper()
        self._watch_schema()

    def readiness(self, timeout: float) -> list[str]:
        """What keeps this process from serving streams now; empty when it is ready.

        The database must answer a ping within ``timeout``; the listener, which
        may still be connecting in a worker that just started, gets half as long;
        the schema must be current (a thread re-checks it, this only reads its result).
        """
        failures = []
        waiting = self._pending_migrations
        if waiting:
            self._watch_schema()
            failures.append(f"schema: migration in progress: waiting for {', '.join(waiting)}")
        try:
            with db.transaction(self.pool, timeout=timeout) as conn:
                store.ping(conn)
        except DatabaseUnavailable as exc:
            failures.append(f"database: {exc}")
        if not self.listener.wait_connected(timeout / 2):
            failures.append(f"listener: not listening on {CHANNEL}")
        return failures

    def begin_shutdown(self) -> None:
        """Answer every waiting long poll now (204, stream intact); keep serving in-flight work.

        Called on SIGTERM: clients continue their streams on another instance.
        """
        self._stopping.set()
        if self._listener is not None:
            self._listener.stop()

    def stop(self) -> None:
        """Shut down, write the last-seen times still owed, and release the pool."""
        self.begin_shutdown()
        if self._streams is not None:
            try:
                self._streams.flush_touches()
            except Exception as exc:
                log.warning("last-seen times owed at shutdown not written: %s", exc)
        if self._access is not None:
            self._access.close()
        if self._pool is not None:
            self._pool.close(timeout=1)


def init_app(
    app: Flask, *, location: str | None = None, pending_migrations: Sequence[str] = ()
) -> None:
    app.extensions[EXTENSION] = Runtime(
        app.config, location=location, pending_migrations=pending_migrations
    )


def runtime() -> Runtime:
    """The current app's runtime."""
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]
