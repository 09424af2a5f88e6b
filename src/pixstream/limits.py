"""Abuse limits of one server process: a rate per ISPB, a gate per stream id, a waiter cap.

No HTTP and no SQL here: the stream service asks these objects before it
spends a database connection or a waiting greenlet, and turns a refusal into
a domain error. Every limit is per process (see docs/security.md, "Rate and
flood limits"): N hosts of W workers allow N x W times the configured rate;
a limit shared in PostgreSQL would cost a round trip on every request.

Only ``threading`` primitives are used: under gunicorn's gevent worker they
are monkey-patched into greenlet primitives, under the dev server they are
threads. Clocks and random numbers are injectable so that tests need no sleeps.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Clock = Callable[[], float]


class TokenBucket:
    """``burst`` tokens per key, refilled at ``rate`` per second; one token per request.

    Memory stays bounded: a bucket that has refilled to ``burst`` is the same
    as no bucket, so such buckets are dropped; beyond ``max_keys`` live
    buckets the least recently used one goes (which only forgives that key).
    """

    def __init__(
        self, rate: float, burst: float, *, max_keys: int = 10_000, clock: Clock = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (tokens at stamp, stamp), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Spend a token of ``key``: 0.0 when granted, else the seconds until one is due."""
        now = self._clock()
        with self._lock:
            tokens, stamp = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - stamp) * self.rate)
            if tokens >= 1:
                tokens -= 1
                wait = 0.0
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > self._max_keys:
                self._evict(now)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        """Drop every full bucket; if still too many, the least recently used ones."""
        full = [
            key
            for key, (tokens, stamp) in self._buckets.items()
            if tokens + (now - stamp) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)


def retry_after_seconds(wait: float) -> int:
    """A Retry-After header value: whole seconds, at least 1, never early."""
    return max(1, math.ceil(wait))


class Flooded(Exception):
    """More requests are outstanding on one key than a retrying client makes."""


class GateBusy(Exception):
    """The key's turn did not come within the time allowed."""


class Ticket:
    """One request admitted on a key of a :class:`Gate`."""

    __slots__ = ("_gate", "_seen", "_slot", "_wake", "key", "released")

    def __init__(self, gate: Gate, slot: _Slot, key: str) -> None:
        self._gate = gate
        self._slot = slot
        self._seen = slot.published
        self.key = key
        self.released = False
        self._wake: Callable[[], None] | None = None

    def shared(self) -> object | None:
        """A result another request of this key published since this one was admitted.

        The two overlapped, so the other's answer is a valid answer to this
        one too: a repeat served in the same instant. Call it holding the turn.
        """
        slot = self._slot
        return slot.result if slot.published > self._seen else None

    def publish(self, result: object) -> None:
        """Offer ``result`` to the requests of this key admitted before now (holding the turn)."""
        self._slot.published += 1
        self._slot.result = result

    @contextmanager
    def exclusive(self, timeout: float) -> Iterator[None]:
        """Be the only request of this key inside the block (e.g. a transaction).

        The others wait here, holding nothing but their greenlet; after
        ``timeout`` seconds GateBusy is raised.
        """
        if not self._slot.mutex.acquire(timeout=max(0.0, timeout)):
            raise GateBusy(f"waited {timeout:g} s for the turn of {self.key}")
        try:
            yield
        finally:
            self._slot.mutex.release()

    @contextmanager
    def waiting(self, wake: Callable[[], None]) -> Iterator[None]:
        """Mark this request as waiting (a long poll): a newer one may release it.

        When released, ``released`` is True and ``wake`` has been called: the
        request should answer now, as at the end of its window.
        """
        self._wake = wake
        with self._gate._lock:
            if not self.released:
                self._slot.waiters.append(self)
        try:
            yield
        finally:
            with self._gate._lock:
                if not self.released:
                    self._slot.waiters.remove(self)
            self._wake = None


class _Slot:
    __slots__ = ("mutex", "published", "requests", "result", "waiters")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.requests = 0  # admitted and not yet done (released ones excluded)
        self.waiters: deque[Ticket] = deque()  # oldest first
        self.published = 0  # how many results were published
        self.result: object | None = None  # the latest of them


class Gate:
    """Per key (a stream id): one request at a time inside, at most ``max_requests`` admitted.

    A request over the limit first releases the oldest admitted request that
    is only waiting for a message (a client that gave up on it and retried);
    only when none is waiting is it refused (Flooded). Slots exist only while
    a request holds them, so idle keys cost nothing.
    """

    def __init__(self, max_requests: int | None) -> None:
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @contextmanager
    def admit(self, key: str) -> Iterator[Ticket]:
        """Admit a request on ``key`` for the duration of the block, or raise Flooded."""
        released: Ticket | None = None
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot()
            if self.max_requests is not None and slot.requests >= self.max_requests:
                if not slot.waiters:
                    if slot.requests == 0:
                        del self._slots[key]
                    raise Flooded(f"{slot.requests} requests already outstanding on {key}")
                released = slot.waiters.popleft()
                released.released = True
                slot.requests -= 1
            slot.requests += 1
            ticket = Ticket(self, slot, key)
        if released is not None and released._wake is not None:
            released._wake()
        try:
            yield ticket
        finally:
            with self._lock:
                if not ticket.released:
                    slot.requests -= 1
                if slot.requests == 0 and self._slots.get(key) is slot:
                    del self._slots[key]


class WaiterCap:
    """At most ``limit`` requests of this process waiting for a message at once.

    ``retry_after`` grows with the refusals of the last ``window`` seconds and
    is jittered, so refused clients do not come back in one wave.
    """

    def __init__(
        self,
        limit: int,
        *,
        window: float = 8.0,
        clock: Clock = time.monotonic,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.limit = limit
        self.waiting = 0
        self._window = window
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._refusals: deque[float] = deque()

    def full(self) -> bool:
        return self.waiting >= self.limit

    def try_enter(self) -> bool:
        with self._lock:
            if self.waiting >= self.limit:
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.waiting -= 1

    def refused(self) -> int:
        """Record a refusal; the Retry-After to give: 1 s and up, more under more load."""
        now = self._clock()
        with self._lock:
            refusals = self._refusals
            refusals.append(now)
            while refusals and refusals[0] < now - self._window:
                refusals.popleft()
            # The spread grows by a window per `limit` refusals in the last window (max 4).
            load = len(refusals) / max(1, self.limit)
            spread = min(4 * self._window, 1 + self._window * load)
        return max(1, math.ceil(self._rng(1.0, 1.0 + spread)))


class Shed(Exception):
    """New work this process cannot serve in time; come back after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"shed; retry after {retry_after} s")
        self.retry_after = retry_after


class SlotTimeout(Exception):
    """No connection slot came free within the time allowed."""


# Priorities of Admission, most urgent first.
WOKEN, READ, START = 0, 1, 2


class Admission:
    """Lends the pool's connections to requests by priority, and sheds what would wait too long.

    At most ``slots`` requests (the pool's size) hold a slot; the others
    wait here, in order of priority, then arrival: a long poll woken by a
    message (``WOKEN``: it delivers, and holds a stream already), then reads
    and closes (``READ``: they confirm and deliver), then stream starts
    (``START``: the most work, nothing delivered yet). So a burst of starts
    queues behind the reads instead of starving them, and the streams
    already held are the last to suffer.

    A newcomer whose expected wait (the requests ahead of it x the mean time
    a slot is held / slots) exceeds its priority's bound in ``shed_after`` is
    refused at once (Shed): it could not be served in time anyway. Priorities
    without a bound (the service gives one to starts only) just queue.

    ``Retry-After`` spreads the refused clients over the time this process
    needs to serve them: the refusals of the last ``window`` seconds divided
    by the slots it completed in that time, jittered uniformly from 1 s,
    capped at ``max_retry_after``.
    """

    def __init__(
        self,
        slots: int,
        shed_after: dict[int, float],
        *,
        window: float = 2.0,
        max_retry_after: int = 30,
        clock: Clock = time.monotonic,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.slots = slots
        self.held = 0
        self._shed_after = shed_after
        self._window = window
        self._max_retry_after = max_retry_after
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._queue: list[tuple[int, int, threading.Event]] = []  # a heap
        self._queued = [0, 0, 0]  # waiting, by priority
        self._arrivals = 0
        self._mean_hold = 0.005  # seconds; an exponential mean, updated on each release
        self._refusals: deque[float] = deque()
        self._completions: deque[float] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def expected_wait(self, priority: int) -> float:
        """Seconds a request of ``priority`` arriving now would wait for a slot."""
        if self.held < self.slots and not self._queue:
            return 0.0
        ahead = sum(self._queued[: priority + 1])
        return (ahead + 1) * self._mean_hold / self.slots

    def check(self, priority: int) -> None:
        """Raise Shed if work of ``priority`` arriving now would wait too long.

        Called on arrival, before the request queues anywhere else (e.g.
        behind the other starts of its ISPB), and again by ``slot``.
        """
        bound = self._shed_after.get(priority)
        if bound is not None and self.expected_wait(priority) > bound:
            with self._lock:
                retry_after = self._refused()
            raise Shed(retry_after)

    @contextmanager
    def slot(self, priority: int, timeout: float) -> Iterator[None]:
        """Hold a slot for the block; Shed at once, or SlotTimeout after ``timeout``."""
        self.check(priority)
        with self._lock:
            if self.held < self.slots and not self._queue:
                self.held += 1
                turn = None
            else:
                self._arrivals += 1
                turn = threading.Event()
                heapq.heappush(self._queue, (priority, self._arrivals, turn))
                self._queued[priority] += 1
        if turn is not None and not turn.wait(timeout):
            with self._lock:
                if not turn.is_set():  # handed a slot meanwhile? then keep it
                    self._queue.remove(next(e for e in self._queue if e[2] is turn))
                    heapq.heapify(self._queue)
                    self._queued[priority] -= 1
                    raise SlotTimeout(f"no database slot within {timeout:g} s")
        started = self._clock()
        try:
            yield
        finally:
            now = self._clock()
            with self._lock:
                self._mean_hold += 0.05 * (now - started - self._mean_hold)
                self._completions.append(now)
                self._trim(self._completions, now)
                if self._queue:
                    queued, _, successor = heapq.heappop(self._queue)
                    self._queued[queued] -= 1
                    successor.set()  # the slot passes on
                else:
                    self.held -= 1

    def _refused(self) -> int:
        """Record a refusal (holding the lock); the Retry-After to give."""
        now = self._clock()
        self._refusals.append(now)
        self._trim(self._refusals, now)
        self._trim(self._completions, now)
        rate = len(self._completions) / self._window
        spread = min(self._max_retry_after - 1, len(self._refusals) / max(rate, 1.0))
        return max(1, min(self._max_retry_after, math.ceil(self._rng(1.0, 1.0 + spread))))

    def _trim(self, stamps: deque[float], now: float) -> None:
        horizon = now - self._window
        while stamps and stamps[0] < horizon:
            stamps.popleft()
