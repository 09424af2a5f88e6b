"""Test data: random messages from the generator, stored with COPY.

The insert trigger notifies each batch's ISPB on commit, so waiting readers
wake as for any other insert.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg_pool import ConnectionPool

from pixstream import db, metrics, store
from pixstream.generator import MessageFactory

# A COPY of one batch is test data, not a protocol request: the statement_timeout
# of pooled connections (db.server_limits: just under the pool timeout) would
# cut a large ``flask seed-pix --batch`` short. This bounds a stuck one
# instead; under gevent, the transaction's deadline still applies.
SEED_STATEMENT_TIMEOUT_SECONDS = 600.0


def insert_random(
    pool: ConnectionPool,
    ispb: str,
    count: int,
    *,
    batch_size: int = 10_000,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """COPY ``count`` random messages for ``ispb``, one transaction per batch.

    Batches bound the size of each transaction, and ``on_batch`` reports
    progress with the count each one wrote.
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
