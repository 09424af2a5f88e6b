"""Idle long polls that skip the database: what this process may trust, and what it owes.

A long poll that found nothing leaves its stream in a known state: its id is
the current pull, confirmed, with no batch and no replay. That state changes
only through something the listener hears of: messages inserted or given back
notify the ISPB (``pix_inserted``), a DELETE or an expiry notifies the stream
(``pix_stream_closed``). So while the process's LISTEN connection has stayed
up and nothing was heard for the ISPB or the stream since that empty claim,
the next long poll on the id would find the same nothing: it may wait without
a transaction (``QuietPulls``). A close heard while it waits wakes it, and it
claims, which answers 410. One poll in ``claim_every`` claims anyway, which
bounds the cost of the one change that notifies nobody: a claim rolled back
after it had skipped rows.

What the skipped transaction would have written, the stream's last-seen time
(idleness counts from a request's answer), is written later, in batches
(``Touches``), long before any expiry could read it: the stream never expires
early, and an idle stream costs a fraction of a transaction per poll.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pixstream.listener import Mark, Wakeup


@dataclass(frozen=True, slots=True)
class Quiet:
    """A pull id whose last claim found nothing, and what was true then."""

    ispb: str
    stream_id: int
    mark: Mark  # the listener's mark for the ISPB, taken before that claim
    skipped: int  # claims skipped since that one
    until: float  # monotonic: past this, ask the database again


class QuietPulls:
    """Pull ids of this process's idle streams (bounded, oldest forgotten first),
    and the polls now waiting on the strength of one.

    Thread-safe: the listener's thread reports closes (``closed``) while
    requests take and remember; the critical sections never block.
    """

    def __init__(self, *, claim_every: int, capacity: int) -> None:
        self.claim_every = claim_every
        self._capacity = capacity
        self._pulls: OrderedDict[str, Quiet] = OrderedDict()
        self._pull_of: dict[int, str] = {}  # stream id -> its quiet pull id
        self._trusting: defaultdict[int, set[Wakeup]] = defaultdict(set)
        self._trusted_pull: dict[int, str] = {}  # stream id -> the pull its trusting polls use
        # Streams heard closed: a poll that claimed before the close and answers
        # after it must not leave its id behind as quiet (closes do not change
        # the ISPB's mark). Bounded; an id is never reused.
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, pull_id: str, quiet: Quiet) -> None:
        if quiet.skipped + 1 >= self.claim_every:
            return  # its next poll claims anyway
        with self._lock:
            if quiet.stream_id in self._closed:
                return
            self._drop_stream(quiet.stream_id)
            self._pulls[pull_id] = quiet
            self._pull_of[quiet.stream_id] = pull_id
            while len(self._pulls) > self._capacity:
                _, oldest = self._pulls.popitem(last=False)
                del self._pull_of[oldest.stream_id]

    @contextmanager
    def trusted(
        self, pull_id: str, ispb: str, mark: Mark | None, wakeup: Wakeup
    ) -> Iterator[Quiet | None]:
        """Yield the quiet state of ``pull_id`` if a poll may skip its claim now, else None.

        Forgotten either way: the poll leaves a new one, or none. ``mark`` is
        the listener's mark for ``ispb``, read after the poll subscribed to
        the ISPB's wake-ups. While the block runs, a close of the stream also
        sets ``wakeup``.
        """
        quiet = self._take(pull_id, ispb, mark, wakeup)
        try:
            yield quiet
        finally:
            if quiet is not None:
                with self._lock:
                    waiters = self._trusting[quiet.stream_id]
                    waiters.discard(wakeup)
                    if not waiters:
                        del self._trusting[quiet.stream_id]
                        del self._trusted_pull[quiet.stream_id]

    def _take(self, pull_id: str, ispb: str, mark: Mark | None, wakeup: Wakeup) -> Quiet | None:
        with self._lock:
            quiet = self._pulls.pop(pull_id, None)
            if quiet is None:
                return None
            del self._pull_of[quiet.stream_id]
            if mark is None or quiet.ispb != ispb or quiet.mark != mark:
                return None
            if time.monotonic() >= quiet.until:
                return None
            self._trusting[quiet.stream_id].add(wakeup)
            self._trusted_pull[quiet.stream_id] = pull_id
            return quiet

    def trusted_pulls(self) -> dict[int, str]:
        """The streams that polls are waiting on without having claimed, and their pull ids."""
        with self._lock:
            return dict(self._trusted_pull)

    def forget(self, pull_id: str) -> None:
        with self._lock:
            quiet = self._pulls.pop(pull_id, None)
            if quiet is not None:
                del self._pull_of[quiet.stream_id]

    def closed(self, payload: str) -> None:
        """A ``pix_stream_closed`` notification: that stream's polls must ask the database."""
        try:
            stream_id = int(payload)
        except ValueError:
            return
        with self._lock:
            self._closed[stream_id] = None
            while len(self._closed) > self._capacity:
                self._closed.popitem(last=False)
        self.moved(stream_id)

    def moved(self, stream_id: int) -> None:
        """The stream was closed, or moved past its quiet pull: its polls must ask the database."""
        with self._lock:
            self._drop_stream(stream_id)
            waiters = list(self._trusting.get(stream_id, ()))
        for wakeup in waiters:
            wakeup.set()

    def _drop_stream(self, stream_id: int) -> None:
        pull_id = self._pull_of.pop(stream_id, None)
        if pull_id is not None:
            del self._pulls[pull_id]

    def __len__(self) -> int:
        return len(self._pulls)


class Touches:
    """Last-seen times owed to the database by polls that skipped their transaction.

    Each is the time the poll's answer is due (monotonic), with the pull id it
    was made on: a stream that moved on since needs no touch.
    """

    def __init__(self) -> None:
        self._due: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.pending = threading.Event()

    def add(self, stream_id: int, pull_id: str, due: float) -> None:
        with self._lock:
            held = self._due.get(stream_id)
            if held is None or held[0] != pull_id or held[1] < due:
                self._due[stream_id] = (pull_id, due)
            self.pending.set()

    def take(self) -> list[tuple[int, str, float]]:
        """Everything owed, as (stream id, pull id, due), and owe nothing."""
        with self._lock:
            due, self._due = self._due, {}
            self.pending.clear()
        return [(stream_id, pull_id, at) for stream_id, (pull_id, at) in due.items()]

    def give_back(self, owed: list[tuple[int, str, float]]) -> None:
        """Owe again what a failed write could not record."""
        for stream_id, pull_id, due in owed:
            self.add(stream_id, pull_id, due)
