"""A pixstream collector that gets the protocol right (docs/integrating.md).

It follows the latest ``Pull-Next``, confirms a batch only by the request it
makes after the handler returned, repeats the same request after a lost
answer or a 503, honours ``Retry-After`` (with jitter) on 429 and 503, opens a
new stream on 410, sends an ``Idempotency-Key`` on every ``stream/start``,
deduplicates on ``endToEndId`` and closes every stream on shutdown.

This module needs only ``httpx`` and the standard library: importing it must
not import Flask, gevent or psycopg (the client-only distribution under
``clients/python/`` ships it without them).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import re
import sqlite3
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urljoin

import httpx

__all__ = [
    "AsyncCollector",
    "AuthError",
    "ClientError",
    "Collection",
    "Collector",
    "MemoryDedup",
    "SqliteDedup",
    "Stats",
    "collect",
    "collect_async",
    "message_json",
]

log = logging.getLogger("pixstream.client")

Message = dict[str, Any]
Handler = Callable[[list[Message]], object]
AsyncHandler = Callable[[list[Message]], Awaitable[object] | object]
Cert = str | tuple[str, str]

MULTIPART = "multipart/json"
# Above the default long-poll window (8 s) plus the 1 s the service may take
# beyond it: a shorter read timeout is safe but costs a repeat (protocol.md).
DEFAULT_TIMEOUT = httpx.Timeout(15.0, connect=5.0)
_ISPB = re.compile(r"^[0-9]{8}$")


class ClientError(Exception):
    """The service refused a request in a way that retrying cannot fix."""


class AuthError(ClientError):
    """401 or 403: the credential is missing, refused or of another ISPB; stop."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class _StreamGone(Exception):
    """410 (or 404, or a used Idempotency-Key): this stream is over, open another."""


class _Stopping(Exception):
    """Shutdown was asked while a request was being retried."""


# --------------------------------------------------------------------------- deduplication


class Dedup(Protocol):
    """Remembers the endToEndIds the handler finished, to drop redeliveries."""

    def seen(self, e2e: str) -> bool: ...

    def add(self, ids: Iterable[str]) -> None: ...


class MemoryDedup:
    """The last ``size`` endToEndIds, in memory; thread-safe.

    Bounded because a collector runs for months; redeliveries come back within
    minutes (an expiry, a lost confirmation), so a window of 100,000 covers them.
    """

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def seen(self, e2e: str) -> bool:
        with self._lock:
            return e2e in self._ids

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            for e2e in ids:
                self._ids[e2e] = None
                self._ids.move_to_end(e2e)
            while len(self._ids) > self.size:
                self._ids.popitem(last=False)


class SqliteDedup:
    """The window in a SQLite file, so that it survives a restart of the collector.

    Each ``add`` commits before the batch is confirmed, so a crash between the
    two never forgets a message it already passed to the handler.
    """

    def __init__(self, path: str | Path, size: int = 1_000_000) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY, e2e TEXT UNIQUE NOT NULL)"
        )

    def seen(self, e2e: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM seen WHERE e2e = ?", (e2e,)).fetchone()
        return row is not None

    def add(self, ids: Iterable[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO seen (e2e) VALUES (?)", ((i,) for i in ids))
            self._db.execute(
                "DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (self.size,)
            )
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------- stats


@dataclass
class Stats:
    """Counters shared by the collectors of one collection (for a status line)."""

    messages: int = 0  # handed to the handler, which returned
    batches: int = 0
    redeliveries: int = 0  # messages dropped because their endToEndId was seen already
    retries: int = 0  # repeated requests: lost answers, 429, 503, 5xx
    handler_errors: int = 0
    new_streams: int = 0
    open_streams: int = 0
    last_error: str = ""
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def error(self, text: str) -> None:
        with self._lock:
            self.last_error = text

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


# --------------------------------------------------------------------------- helpers


def message_json(message: Message) -> str:
    """One message as a JSON line, ``valor`` written exactly as received (e.g. ``90.20``)."""
    text = json.dumps(_mark_decimals(message), ensure_ascii=False, separators=(",", ":"))
    return _MARKED.sub(r"\1", text)


_MARKED = re.compile(r'"\\u0000dec:([-+0-9.eE]+)"')


def _mark_decimals(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"\x00dec:{value}"
    if isinstance(value, dict):
        return {k: _mark_decimals(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mark_decimals(v) for v in value]
    return value


def _parse(response: httpx.Response) -> list[Message]:
    # valor is an exact decimal on the wire: never let it become a float.
    body = json.loads(response.content, parse_float=Decimal)
    return body if isinstance(body, list) else [body]


def _retry_after(response: httpx.Response, default: float = 1.0) -> float:
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else default


def _jitter(seconds: float) -> float:
    """Retry-After plus up to 20 % (at least 0.1 s): refused clients must not return together."""
    return seconds + random.uniform(0.0, max(0.1, 0.2 * seconds))


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("detail") or body.get("title") or response.reason_phrase)
    except ValueError:
        return response.text[:200] or response.reason_phrase


def _ssl_context(cert: Cert | None, verify: bool | str) -> ssl.SSLContext | bool:
    """httpx 0.28 takes client certificates only through an SSLContext."""
    if cert is None and not isinstance(verify, str):
        return verify
    if isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context()
        if not verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        context.load_cert_chain(certfile, keyfile)
    return context


@dataclass(frozen=True)
class _Settings:
    base_url: str
    ispb: str
    batch: bool
    backoff: tuple[float, float]

    @property
    def start(self) -> str:
        return f"/api/pix/{self.ispb}/stream/start"

    def headers(self) -> dict[str, str]:
        return {"Accept": MULTIPART if self.batch else "application/json"}

    def url(self, path: str) -> str:
        return urljoin(self.base_url, path)


def _settings(base_url: str, ispb: str, batch: bool, backoff: tuple[float, float]) -> _Settings:
    if not _ISPB.match(ispb):
        raise ValueError(f"ISPB must be exactly 8 digits, got {ispb!r}")
    return _Settings(base_url.rstrip("/") + "/", ispb, batch, backoff)


def _http_options(
    token: str | None, cert: Cert | None, verify: bool | str, timeout: httpx.Timeout | float
) -> dict[str, Any]:
    # Uncompressed bodies: gzip costs the service more CPU per answer than it
    # saves on a fast link (bench/client_drain.py). A client passed as ``http=``
    # keeps its own Accept-Encoding.
    headers = {"Accept-Encoding": "identity"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return {"headers": headers, "verify": _ssl_context(cert, verify), "timeout": timeout}


def _classify(response: httpx.Response, stats: Stats) -> float | None:
    """What an answer means: None to use it, seconds to wait before repeating it.

    Raises for the answers that end the stream (410, 404, a used key) or the
    whole collection (401, 403, other 4xx).
    """
    status = response.status_code
    if status in (200, 204):
        return None
    detail = _detail(response)
    stats.error(f"{status} {detail}")
    if status in (401, 403):
        raise AuthError(status, detail)
    if status in (410, 404) or (status == 409 and "idempotency-key-used" in response.text):
        raise _StreamGone(f"{status} {detail}")
    if status in (429, 503):
        return _jitter(_retry_after(response))
    if status >= 500 or status == 409:
        return _jitter(1.0)
    raise ClientError(f"{status} {detail}")


class _Backoff:
    """Exponential backoff with full jitter after handler failures, reset by success."""

    def __init__(self, first: float, most: float) -> None:
        self.first, self.most, self.failures = first, most, 0

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self.most, self.first * 2 ** (self.failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


def _transport_delay(attempt: int) -> float:
    return random.uniform(0.05, min(2.0, 0.1 * 2**attempt))


def _fresh(messages: list[Message], dedup: Dedup, stats: Stats) -> list[Message]:
    fresh = [m for m in messages if not dedup.seen(str(m.get("endToEndId")))]
    if len(fresh) < len(messages):
        stats.bump(redeliveries=len(messages) - len(fresh))
    return fresh


# --------------------------------------------------------------------------- one stream, threads


class Collector:
    """One stream of one ISPB, read in the calling thread by :meth:`run`.

    ``handler(messages)`` gets each batch (after deduplication; never empty)
    and the batch is confirmed only by the request made after it returned. If
    it raises, the batch is not confirmed: the stream is closed with the
    previous id (the documented way to give the batch back at once; a batch
    that came with ``stream/start`` has no previous id and comes back when the
    abandoned stream expires), the error is logged, and a new stream starts
    after a backoff.

    :meth:`stop` (from any thread) ends :meth:`run`: a batch being handled is
    finished and confirmed, and the stream is closed with ``DELETE``; a long
    poll in progress is ended at once by that ``DELETE``.
    """

    def __init__(
        self,
        base_url: str,
        ispb: str,
        *,
        handler: Handler,
        token: str | None = None,
        cert: Cert | None = None,
        verify: bool | str = True,
        batch: bool = True,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        dedup: Dedup | None = None,
        stats: Stats | None = None,
        http: httpx.Client | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        name: str = "collector",
    ) -> None:
        self.settings = _settings(base_url, ispb, batch, backoff)
        self.handler = handler
        self.dedup: Dedup = dedup if dedup is not None else MemoryDedup()
        self.stats = stats if stats is not None else Stats()
        self.name = name
        self._own_http = http is None
        self.http = http or httpx.Client(**_http_options(token, cert, verify, timeout))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._polling: str | None = None  # the id of a long poll in progress
        self._closed = False  # the current stream was closed (by stop() or by run)
        # stop() deleted the stream under a long poll: nothing is left to wait for
        # (the service may answer that poll only at the end of its window).
        self.detached = False

    # -- lifecycle

    def __enter__(self) -> Collector:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.close()

    def close(self) -> None:
        """Release the HTTP connections (if this collector made its own client)."""
        if self._own_http:
            self.http.close()

    def stop(self) -> None:
        """Ask :meth:`run` to finish; ends a long poll in progress at once (thread-safe)."""
        self._stop.set()
        with self._lock:
            target, self._polling = self._polling, None
            if target is None or self._closed:
                return
            self._closed = True
            self.detached = True
        self.stats.bump(open_streams=-1)  # deleted now; its poll's end is not awaited
        # The batch before this poll was handled: DELETE confirms it and closes
        # the stream; the poll then ends (a batch it got goes back to the queue).
        self._delete(target)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Read streams until :meth:`stop`; raises AuthError or ClientError on fatal answers."""
        backoff = _Backoff(*self.settings.backoff)
        while not self._stop.is_set():
            try:
                self._stream(backoff)
            except _StreamGone as exc:
                log.info("%s: stream gone (%s); opening a new one", self.name, exc)
            except _HandlerFailed:
                self._stop.wait(backoff.next())

    # -- one stream

    def _stream(self, backoff: _Backoff) -> None:
        start = self.settings.start
        key = str(uuid.uuid4())  # one per stream, the same on the start's repeats
        with self._lock:
            self._closed = False
        path = start
        response = self._read(path, {"Idempotency-Key": key})
        if response is None:
            return
        self.stats.bump(new_streams=1, open_streams=1)
        try:
            while True:
                pull_next = response.headers["Pull-Next"]
                if response.status_code == 200:
                    fresh = _fresh(_parse(response), self.dedup, self.stats)
                    if fresh:
                        try:
                            self.handler(fresh)
                        except Exception as exc:
                            # ``path`` brought this batch: DELETE of it gives the batch back.
                            self._handler_failed(exc, None if path == start else path)
                            raise _HandlerFailed from exc
                        self.dedup.add(str(m.get("endToEndId")) for m in fresh)
                        self.stats.bump(messages=len(fresh), batches=1)
                    backoff.reset()
                if self._stop.is_set():
                    self._close_stream(pull_next)
                    return
                path = pull_next
                response = self._read(path, None)
                if response is None:
                    return
        finally:
            if not self.detached:  # else stop() counted it closed already
                self.stats.bump(open_streams=-1)

    @property
    def in_long_poll(self) -> bool:
        """True while a read of a stream id (not a start) is in progress: stop() ends it at once."""
        return self._polling is not None

    def _read(self, path: str, extra: dict[str, str] | None) -> httpx.Response | None:
        """GET ``path`` until a usable answer; None when stopped (the stream is then closed).

        A start cannot be cut short (there is no id to DELETE yet): it ends
        within its long-poll window, and the stream is closed after it.
        """
        with self._lock:
            stopping = self._stop.is_set()
            if not stopping and path != self.settings.start:
                self._polling = path
        if stopping:
            if path != self.settings.start:
                self._close_stream(path)
            return None
        response: httpx.Response | None = None
        try:
            response = self._send("GET", path, extra)
        except _Stopping:
            pass
        except (_StreamGone, ClientError):
            with self._lock:
                if self._closed:
                    return None  # our own DELETE closed it: not an error
            raise
        finally:
            with self._lock:
                self._polling = None
                closed = self._closed
        if closed:
            return None  # stop() deleted the stream: whatever this poll got goes back
        if response is None:
            if path != self.settings.start:
                self._close_stream(path)
            return None
        return response

    def _send(self, method: str, path: str, extra: dict[str, str] | None) -> httpx.Response:
        """One request, repeated (same URL, same headers) until it gets a usable answer."""
        headers = {**self.settings.headers(), **(extra or {})}
        url = self.settings.url(path)
        attempt = 0
        while True:
            try:
                response = self.http.request(method, url, headers=headers)
                wait = _classify(response, self.stats)
                if wait is None:
                    return response
                log.warning("%s: %s %s -> %s; again in %.1f s", self.name, method, path,
                            response.status_code, wait)  # fmt: skip
            except httpx.TransportError as exc:
                attempt += 1
                wait = _transport_delay(attempt)
                self.stats.error(f"{type(exc).__name__}: {exc}")
                log.warning("%s: %s %s: %r; repeating", self.name, method, path, exc)
            self.stats.bump(retries=1)
            if self._stop.wait(wait) and method == "GET":
                raise _Stopping

    def _handler_failed(self, exc: Exception, previous: str | None) -> None:
        self.stats.bump(handler_errors=1)
        self.stats.error(f"handler: {exc!r}")
        log.error("%s: handler failed; batch not confirmed", self.name, exc_info=exc)
        with self._lock:
            self._closed = True
        if previous is None:
            log.warning("%s: the batch came with stream/start: it comes back when the "
                        "abandoned stream expires", self.name)  # fmt: skip
            return
        self._delete(previous)  # "I never saw the last answer": the batch goes back now

    def _close_stream(self, path: str) -> None:
        """Confirm what was handled and close the stream, once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._delete(path)

    def _delete(self, path: str, patience: float = 5.0) -> None:
        """DELETE ``path``, repeated after lost answers for up to ``patience`` seconds."""
        url = self.settings.url(path)
        deadline = time.monotonic() + patience
        while True:
            try:
                response = self.http.request("DELETE", url, headers=self.settings.headers())
                if response.status_code in (200, 410, 404) or time.monotonic() > deadline:
                    return
                delay = min(_retry_after(response), 1.0)
            except httpx.TransportError as exc:
                if time.monotonic() > deadline:
                    log.warning("%s: DELETE %s failed: %r", self.name, path, exc)
                    return
                delay = 0.1
            time.sleep(delay)  # a short wait before repeating the DELETE


class _HandlerFailed(Exception):
    pass


# --------------------------------------------------------------------------- N streams, threads


class Collection:
    """``streams`` collectors of one ISPB in threads, sharing a connection pool,
    a deduplication window and the stats.

    Use it as a context manager: leaving it (or :meth:`close`) finishes and
    confirms the batches being handled and deletes every stream. The handler
    is called from several threads at once: make it thread-safe (or use
    ``streams=1``).
    """

    def __init__(
        self,
        base_url: str,
        ispb: str,
        handler: Handler,
        *,
        streams: int = 6,
        token: str | None = None,
        cert: Cert | None = None,
        verify: bool | str = True,
        batch: bool = True,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        dedup: Dedup | None = None,
        http: httpx.Client | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        if not 1 <= streams <= 6:
            raise ValueError("streams must be 1 to 6 (the service's limit per ISPB)")
        self.stats = Stats()
        self.dedup: Dedup = dedup if dedup is not None else MemoryDedup()
        self._own_http = http is None
        # One connection per stream, plus the DELETEs that stop() sends during a poll.
        limits = httpx.Limits(max_connections=2 * streams + 2)
        self.http = http or httpx.Client(
            **_http_options(token, cert, verify, timeout), limits=limits
        )
        self.collectors = [
            Collector(base_url, ispb, handler=handler, batch=batch, dedup=self.dedup,
                      stats=self.stats, http=self.http, backoff=backoff, name=f"stream-{n + 1}")
            for n in range(streams)
        ]  # fmt: skip
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Collection:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Collection:
        for collector in self.collectors:
            # Daemon threads: after stop(), a poll whose stream was deleted may be
            # answered only at the end of its window; its answer is discarded.
            thread = threading.Thread(
                target=self._run, args=(collector,), name=collector.name, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, collector: Collector) -> None:
        try:
            collector.run()
        except BaseException as exc:  # a fatal answer: stop every stream
            if collector.detached:
                return  # the answer of a poll cut short by stop(): no longer ours
            log.error("%s: %s", collector.name, exc)
            self.stats.error(str(exc))
            if self.error is None:
                self.error = exc
            self._done.set()
            threading.Thread(target=self._stop_all, daemon=True).start()

    def _stop_all(self) -> None:
        for collector in self.collectors:
            collector.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a fatal error stops the collection (or ``timeout``); Ctrl-C interrupts."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                return False
            self._done.wait(left)  # short waits keep the main thread responsive to Ctrl-C
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Finish and confirm the batches in hand, delete every stream, join the threads."""
        stoppers = [threading.Thread(target=c.stop) for c in self.collectors]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(timeout)
        # Wait for the collectors that finish a batch (it must be confirmed), not
        # for those whose long poll stop() cut short by deleting its stream.
        deadline = time.monotonic() + timeout
        for collector, thread in zip(self.collectors, self._threads, strict=True):
            while thread.is_alive() and not collector.detached and time.monotonic() < deadline:
                thread.join(0.05)
        self._done.set()
        if self._own_http:
            threading.Thread(target=self._close_http, daemon=True).start()

    def _close_http(self) -> None:
        """Close the connections once the discarded polls have ended (within their window)."""
        for thread in self._threads:
            thread.join()
        self.http.close()


def collect(
    base_url: str,
    ispb: str,
    handler: Handler,
    *,
    streams: int = 6,
    stop: threading.Event | None = None,
    **options: Any,
) -> Stats:
    """Collect with ``streams`` threads until ``stop`` is set or Ctrl-C; the stats.

    Options are :class:`Collection`'s. Raises AuthError (401, 403) or
    ClientError when the service refuses in a way retrying cannot fix; every
    stream is closed first.
    """
    collection = Collection(base_url, ispb, handler, streams=streams, **options)
    with collection:
        try:
            while not collection.wait(0.5):
                if stop is not None and stop.is_set():
                    break
        except KeyboardInterrupt:
            log.info("interrupted: finishing the batches in hand and closing the streams")
    if collection.error is not None:
        raise collection.error
    return collection.stats


# --------------------------------------------------------------------------- asyncio


class AsyncCollector:
    """One stream on asyncio; the same contract as :class:`Collector`.

    ``handler`` may be a function or a coroutine function. :meth:`stop` ends
    :meth:`run` gracefully: a long poll in progress is cancelled and its
    stream deleted (confirming the batch already handled); a start in
    progress is let finish (there is no id to delete yet), then closed.
    Cancelling :meth:`run` itself during the handler does not confirm the batch.
    """

    def __init__(
        self,
        base_url: str,
        ispb: str,
        *,
        handler: AsyncHandler,
        token: str | None = None,
        cert: Cert | None = None,
        verify: bool | str = True,
        batch: bool = True,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        dedup: Dedup | None = None,
        stats: Stats | None = None,
        http: httpx.AsyncClient | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        name: str = "collector",
    ) -> None:
        self.settings = _settings(base_url, ispb, batch, backoff)
        self.handler = handler
        self.dedup: Dedup = dedup if dedup is not None else MemoryDedup()
        self.stats = stats if stats is not None else Stats()
        self.name = name
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(**_http_options(token, cert, verify, timeout))
        self._stopping = False
        self._poll: asyncio.Future[httpx.Response] | None = None
        self._wake: asyncio.Event | None = None

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    def stop(self) -> None:
        """Ask :meth:`run` to return; cuts a long poll short (call it on the loop's thread)."""
        self._stopping = True
        if self._poll is not None:
            self._poll.cancel()
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Read streams until :meth:`stop`; raises AuthError or ClientError on fatal answers."""
        backoff = _Backoff(*self.settings.backoff)
        self._wake = asyncio.Event()
        while not self._stopping:
            try:
                await self._stream(backoff)
            except _StreamGone as exc:
                log.info("%s: stream gone (%s); opening a new one", self.name, exc)
            except _HandlerFailed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff.next())

    async def _stream(self, backoff: _Backoff) -> None:
        start = self.settings.start
        key = str(uuid.uuid4())
        path = start
        response = await self._send("GET", path, {"Idempotency-Key": key})
        self.stats.bump(new_streams=1, open_streams=1)
        try:
            while True:
                pull_next = response.headers["Pull-Next"]
                if response.status_code == 200:
                    fresh = _fresh(_parse(response), self.dedup, self.stats)
                    previous = None if path == start else path
                    if fresh:
                        try:
                            result = self.handler(fresh)
                            if inspect.isawaitable(result):
                                await result
                        except asyncio.CancelledError:
                            # Not finished: not confirmed. Give it back if we can.
                            if previous is not None:
                                await asyncio.shield(self._delete(previous))
                            raise
                        except Exception as exc:
                            self.stats.bump(handler_errors=1)
                            self.stats.error(f"handler: {exc!r}")
                            log.error("%s: handler failed; batch not confirmed", self.name,
                                      exc_info=exc)  # fmt: skip
                            if previous is not None:
                                await self._delete(previous)
                            raise _HandlerFailed from exc
                        self.dedup.add(str(m.get("endToEndId")) for m in fresh)
                        self.stats.bump(messages=len(fresh), batches=1)
                    backoff.reset()
                if self._stopping:
                    await self._delete(pull_next)
                    return
                path = pull_next
                self._poll = asyncio.ensure_future(self._send("GET", path, None))
                try:
                    response = await self._poll
                except asyncio.CancelledError:
                    # stop() or a cancellation of run(): either way the batch before
                    # this poll was handled, so DELETE confirms it and closes.
                    await asyncio.shield(self._delete(path))
                    task = asyncio.current_task()
                    if self._stopping and not (task and task.cancelling()):
                        return
                    raise
                finally:
                    self._poll = None
        finally:
            self.stats.bump(open_streams=-1)

    async def _send(self, method: str, path: str, extra: dict[str, str] | None) -> httpx.Response:
        headers = {**self.settings.headers(), **(extra or {})}
        url = self.settings.url(path)
        attempt = 0
        while True:
            try:
                response = await self.http.request(method, url, headers=headers)
                wait = _classify(response, self.stats)
                if wait is None:
                    return response
            except httpx.TransportError as exc:
                attempt += 1
                wait = _transport_delay(attempt)
                self.stats.error(f"{type(exc).__name__}: {exc}")
            self.stats.bump(retries=1)
            await asyncio.sleep(wait)

    async def _delete(self, path: str, patience: float = 5.0) -> None:
        url = self.settings.url(path)
        deadline = time.monotonic() + patience
        while True:
            try:
                response = await self.http.request("DELETE", url, headers=self.settings.headers())
                if response.status_code in (200, 410, 404) or time.monotonic() > deadline:
                    return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    return
            await asyncio.sleep(0.1)


async def collect_async(
    base_url: str,
    ispb: str,
    handler: AsyncHandler,
    *,
    streams: int = 6,
    stop: asyncio.Event | None = None,
    token: str | None = None,
    cert: Cert | None = None,
    verify: bool | str = True,
    batch: bool = True,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    dedup: Dedup | None = None,
    backoff: tuple[float, float] = (0.5, 30.0),
) -> Stats:
    """``streams`` AsyncCollectors until ``stop`` is set or the task is cancelled.

    On stop or cancellation every stream is closed: a long poll in progress
    is cancelled and its stream deleted, which confirms the batches the
    handler finished and nothing else; a start in progress is let finish
    (within the long-poll window), then its stream is deleted.
    """
    if not 1 <= streams <= 6:
        raise ValueError("streams must be 1 to 6 (the service's limit per ISPB)")
    stats, shared = Stats(), dedup if dedup is not None else MemoryDedup()
    async with httpx.AsyncClient(**_http_options(token, cert, verify, timeout)) as http:
        collectors = [
            AsyncCollector(base_url, ispb, handler=handler, batch=batch, dedup=shared,
                           stats=stats, http=http, backoff=backoff, name=f"stream-{n + 1}")
            for n in range(streams)
        ]  # fmt: skip
        tasks = [asyncio.create_task(c.run()) for c in collectors]
        waiters: list[asyncio.Future[Any]] = list(tasks)
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopped is not None:
            waiters.append(stopped)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Graceful even when cancelled: finish the handlers, delete every stream.
            for collector in collectors:
                collector.stop()
            if stopped is not None:
                stopped.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result
    return stats
