"""Test data: random messages from the generator, stored with COPY.

The insert trigger notifies each batch's ISPB on commit, so waiting readers
wake as for any other insert.
"""

from __future__ import annotations

from collections.abc import Callable

from psycopg_pool import ConnectionPool

from pixstream import db, metrics, store
from pixstream.generator import MessageFactory


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
            written = store.copy_messages(conn, factory.rows(ispb, size))
        inserted += written
        metrics.MESSAGES_INSERTED.inc(written)
        if on_batch is not None:
            on_batch(written)
    return inserted
