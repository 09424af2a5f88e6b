"""Test data: random messages from the generator, stored with COPY.

The insert trigger notifies the ISPB on commit, so waiting readers wake as for
any other insert.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

from psycopg_pool import ConnectionPool

from pixstream import db, metrics, store
from pixstream.generator import MessageFactory

# A COPY of one batch is test data, not a protocol request: the statement_timeout
# of pooled connections (db.server_limits: just under the pool timeout) would
# cut a large ``flask seed-pix --batch`` short. This bounds a stuck one
# instead; under gevent, the transaction's deadline still applies.
SEED_STATEMENT_TIMEOUT_SECONDS = 600.0

# The util route's insert runs in a request's greenlet, on the gevent hub: rows
# are made this many at a time (well under a millisecond of CPU), and the hub
# serves every pending event between chunks. Measured with
# tests/test_util_insert_hub.py on a loaded 2-core machine, pushes to a waiting
# collector of the same worker took at most about 40 ms during a 100,000-row
# insert with chunks of 25-50 rows; chunks of 250-500 went past 50 ms, and so
# did making the rows in gevent's thread pool (up to 150 ms: the hub waits up
# to the GIL's 5 ms switch interval at every wake-up of a push's round trips).
CHUNK_ROWS = 50

# The util insert's deadline (client- and server-side) grows with its size: the
# pool timeout for the connection and the commit, plus one second per 10,000
# rows: 13 s for 100,000, which took 1.4-1.5 s on a loaded 2-core machine.
UTIL_ROWS_PER_SECOND = 10_000


def util_insert_deadline(count: int, pool_timeout: float) -> float:
    """Seconds the all-or-nothing util insert of ``count`` rows may take."""
    return pool_timeout + count / UTIL_ROWS_PER_SECOND


def insert_random(
    pool: ConnectionPool,
    ispb: str,
    count: int,
    *,
    batch_size: int = 10_000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """COPY ``count`` random messages for ``ispb``, one transaction per batch.

    For ``flask seed-pix``: batches bound the size of each transaction and
    ``on_batch`` reports progress; a failure keeps the batches already
    committed (the command says how many). The util route, which must be
    all-or-nothing and must not hold up the gevent hub, uses
    insert_random_atomic.
    """
    factory = MessageFactory()
    inserted = 0
    while inserted < count:
        size = min(batch_size, count - inserted)
        with db.transaction(pool) as conn:
            store.set_local_statement_timeout(conn, SEED_STATEMENT_TIMEOUT_SECONDS)
            written = store.copy_messages(conn, factory.rows(ispb, size))
        inserted += written
        metrics.MESSAGES_INSERTED.inc(written)
        if on_batch is not None:
            on_batch(written)
    return inserted


def insert_random_atomic(pool: ConnectionPool, ispb: str, count: int) -> int:
    """COPY ``count`` random messages for ``ispb`` in one transaction; the count.

    All or nothing: a failure, the deadline (util_insert_deadline, enforced by
    the client under gevent and by statement_timeout on the server) included,
    rolls every row back and raises DatabaseUnavailable (503). The rows stream
    into one COPY chunk by chunk, and the hub serves the worker's long polls
    between chunks (CHUNK_ROWS).
    """
    limit = util_insert_deadline(count, pool.timeout)
    factory = MessageFactory()
    with db.transaction(pool, timeout=limit) as conn:
        store.set_local_statement_timeout(conn, limit)
        written = store.copy_messages(conn, _chunked_rows(factory, ispb, count))
    metrics.MESSAGES_INSERTED.inc(written)
    return written


def _chunked_rows(factory: MessageFactory, ispb: str, count: int) -> Iterator[tuple[object, ...]]:
    """``count`` rows, made CHUNK_ROWS at a time by _make_chunk."""
    made = 0
    while made < count:
        chunk = _make_chunk(factory, ispb, min(CHUNK_ROWS, count - made))
        yield from chunk
        made += len(chunk)


def _make_chunk(factory: MessageFactory, ispb: str, size: int) -> list[tuple[object, ...]]:
    """Let the hub serve what is pending (under gevent), then make ``size`` rows.

    gevent.idle returns once the loop has no pending event: long polls, the
    listener and other requests go first, and the insert gets the hub's spare
    time (on a saturated worker it may then run into its deadline: 503, no
    rows). The dev server has no hub: plain calls.
    """
    if db._gevent_running():
        sys.modules["gevent"].idle()
    return list(factory.rows(ispb, size))
