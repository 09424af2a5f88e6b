"""The collection protocol (../shared/docs/protocol.md), free of HTTP and of SQL.

A stream is a chain of pulls. Each answer hands out the next pull id as
``Pull-Next``; the batch delivered with it stays bound to it until the client
uses that id again (GET or DELETE), which confirms it. Only the stream's
current pull can hold an unconfirmed batch, so expiry and DELETE give back at
most one batch. A repeat of the request that produced the current pull
(``replay_pull``) gets the same answer; any older id is superseded (410).
"""

from __future__ import annotations

import logging
import secrets
import string
import time
from dataclasses import dataclass

import psycopg
from psycopg_pool import ConnectionPool

from pixstream import db, store
from pixstream.errors import StreamGone, StreamNotFound, TooManyStreams
from pixstream.listener import Listener

log = logging.getLogger(__name__)

_ID_ALPHABET = string.ascii_lowercase + string.digits
_ID_LENGTH = 24  # 24 symbols of 36: 124 bits, unguessable


def new_pull_id() -> str:
    """Return a fresh, unguessable interationId."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def is_well_formed_pull_id(value: str) -> bool:
    return 12 <= len(value) <= 64 and all(c in _ID_ALPHABET for c in value)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One answer: the batch (empty means 204) and the id to follow next."""

    pull_next: str
    documents: list[str]


@dataclass(frozen=True, slots=True)
class Settings:
    long_poll_seconds: float
    idle_seconds: float
    max_streams: int
    max_batch: int


class StreamService:
    """Open, read, close and expire streams; wait for messages without polling."""

    def __init__(self, pool: ConnectionPool, listener: Listener, settings: Settings) -> None:
        self._pool = pool
        self._listener = listener
        self.settings = settings

    def start(self, ispb: str, batch_size: int) -> Delivery:
        """Open a stream and read from it (long poll)."""
        return self._read(ispb, None, batch_size)

    def pull(self, ispb: str, pull_id: str, batch_size: int) -> Delivery:
        """Confirm the batch delivered with ``pull_id`` and read the next one (long poll)."""
        return self._read(ispb, pull_id, batch_size)

    def close(self, ispb: str, pull_id: str) -> None:
        """Confirm the batch delivered with ``pull_id`` and close its stream.

        Closing through the id that preceded the current one means the client
        never saw the current batch: it goes back to the queue.
        """
        with db.transaction(self._pool) as conn:
            stream = self._locked_stream(conn, ispb, pull_id)
            if stream is None:
                gone = True
            elif pull_id == stream.current_pull:
                store.confirm_pull(conn, pull_id)
                store.close_stream(conn, stream.id, "deleted")
                gone = False
            elif pull_id == stream.replay_pull:
                released = store.release_pull(conn, stream.current_pull)
                store.close_stream(conn, stream.id, "deleted")
                log.info(
                    "stream %s of %s closed; %d unconfirmed back in queue",
                    stream.id,
                    ispb,
                    released,
                )
                gone = False
            else:
                gone = True
        if gone:
            raise StreamGone(f"stream id {pull_id} was superseded, closed or expired")

    def sweep(self) -> store.Expiry:
        """Expire every idle stream now, handing its unconfirmed batch back."""
        with db.transaction(self._pool) as conn:
            expiry = store.expire_idle_streams(conn, idle_seconds=self.settings.idle_seconds)
        if expiry.streams:
            log.info(
                "expired %d idle streams; %d messages back in queue",
                expiry.streams,
                expiry.released,
            )
        return expiry

    def _read(self, ispb: str, pull_id: str | None, batch_size: int) -> Delivery:
        batch_size = max(1, min(batch_size, self.settings.max_batch))
        deadline = time.monotonic() + self.settings.long_poll_seconds
        # Subscribe before the first claim: an insert committed after that
        # claim found nothing sets the event, so the wait below cannot miss it.
        with self._listener.subscribe(ispb) as wakeup:
            delivery = self._attempt(ispb, pull_id, batch_size)
            while not delivery.documents and not self._listener.closing:
                remaining = deadline - time.monotonic()
                woken = remaining > 0 and wakeup.wait(remaining)
                if self._listener.closing:
                    break
                wakeup.clear()  # before the claim: a later insert must wake us again
                # On a wake-up, claim; at the end of the window, re-check once
                # (a notification can be lost while the listener reconnects).
                delivery = self._attempt(ispb, delivery.pull_next, batch_size)
                if not woken:
                    break
        return delivery

    def _attempt(self, ispb: str, pull_id: str | None, batch_size: int) -> Delivery:
        """One transaction: open or lock the stream, confirm, claim, advance."""
        with db.transaction(self._pool) as conn:
            if pull_id is None:
                pull_id = new_pull_id()
                stream_id = store.open_stream(
                    conn,
                    ispb,
                    pull_id,
                    max_streams=self.settings.max_streams,
                    idle_seconds=self.settings.idle_seconds,
                )
                if stream_id is None:
                    refused = True
                else:
                    refused = False
                    log.info("stream %s of %s opened", stream_id, ispb)
                    delivery = self._claim(conn, ispb, stream_id, pull_id, batch_size)
            else:
                refused = False
                stream = self._locked_stream(conn, ispb, pull_id)
                if stream is None:
                    delivery = None
                elif pull_id == stream.replay_pull:
                    # A repeat of the request that produced the current batch.
                    store.touch_stream(conn, stream.id)
                    delivery = Delivery(
                        stream.current_pull, store.batch_documents(conn, stream.current_pull)
                    )
                elif pull_id == stream.current_pull:
                    if not stream.current_confirmed:
                        store.confirm_pull(conn, pull_id)
                    store.expire_idle_streams(
                        conn, idle_seconds=self.settings.idle_seconds, ispb=ispb
                    )
                    delivery = self._claim(conn, ispb, stream.id, pull_id, batch_size)
                else:
                    delivery = None
        if refused:
            raise TooManyStreams(
                f"ISPB {ispb} already has {self.settings.max_streams} open streams",
                retry_after=max(1, round(self.settings.long_poll_seconds)),
            )
        if delivery is None:
            raise StreamGone(f"stream id {pull_id} was superseded, closed or expired")
        return delivery

    def _claim(
        self, conn: psycopg.Connection, ispb: str, stream_id: int, used_pull: str, batch_size: int
    ) -> Delivery:
        """Claim the next batch for a stream whose current pull ``used_pull`` was just used."""
        next_pull = new_pull_id()
        claimed = store.claim_batch(conn, ispb, next_pull, batch_size)
        if not claimed.documents:
            store.supersede_replay(conn, stream_id)
            return Delivery(used_pull, [])
        store.advance_stream(conn, stream_id, next_pull, replay=used_pull)
        return Delivery(next_pull, claimed.documents)

    def _locked_stream(
        self, conn: psycopg.Connection, ispb: str, pull_id: str
    ) -> store.StreamRow | None:
        """Lock the stream behind ``pull_id``; None when it is closed or expired (410).

        Raises StreamNotFound for an id never issued, or issued to another ISPB.
        A stream found idle is expired on the spot (lazily), before the sweep.
        """
        stream = store.lock_stream(conn, pull_id, idle_seconds=self.settings.idle_seconds)
        if stream is None or stream.ispb != ispb:
            raise StreamNotFound(f"no stream of ISPB {ispb} has the id {pull_id}")
        if stream.closed:
            return None
        if stream.idle:
            store.expire_idle_streams(conn, idle_seconds=self.settings.idle_seconds, ispb=ispb)
            return None
        return stream
