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
