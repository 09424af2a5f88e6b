"""The service's statements (collection, credentials, retention, seeding), from sql/queries.sql.

Every function takes the caller's connection: the caller owns the transaction,
this module owns the statements. Two modules run SQL of their own: migrate.py
applies the migrations (with its ledger table and advisory lock), and
listener.py runs on its own connection what only that connection needs: its
session settings, ``LISTEN``, the liveness probe and the reconnect scan of
queued ISPBs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pixstream.sql import QUERIES


@dataclass(frozen=True, slots=True)
class StreamRow:
    """A stream as seen through one of its pull ids, row-locked for this transaction."""

    id: int
    ispb: str
    current_pull: str
    replay_pull: str | None
    close_reason: str | None  # None while open; "deleted" or "expired"
    closed_by_pull: str | None  # the id a DELETE closed it with
    idle: bool
    idle_in_ispb: bool  # some open stream of the ISPB (this one too) is past its idle window


@dataclass(frozen=True, slots=True)
class Claimed:
    """A batch bound to a pull: message documents oldest first."""

    documents: list[str]
    redelivered: int


@dataclass(frozen=True, slots=True)
class Read:
    """What a read's statement did: the batch it claimed, and how many it confirmed."""

    claimed: Claimed
    confirmed: int


@dataclass(frozen=True, slots=True)
class ExpiredStream:
    """A stream just expired, and how many unconfirmed messages it gave back."""

    id: int
    ispb: str
    released: int


def _run(conn: psycopg.Connection, name: str, params: dict[str, Any] | None = None) -> Any:
    return conn.execute(QUERIES[name], params)  # type: ignore[arg-type]


def ping(conn: psycopg.Connection) -> None:
    _run(conn, "ping")


def lock_ispb(conn: psycopg.Connection, ispb: str) -> None:
    """Serialise stream creation for ``ispb`` until this transaction ends."""
    _run(conn, "lock_ispb", {"ispb": ispb})


def count_open_streams(conn: psycopg.Connection, ispb: str) -> int:
    return int(_run(conn, "count_open_streams", {"ispb": ispb}).fetchone()[0])


def count_all_open_streams(conn: psycopg.Connection) -> int:
    return int(_run(conn, "count_all_open_streams").fetchone()[0])


def insert_stream(
    conn: psycopg.Connection,
    ispb: str,
    pull: str,
    *,
    idempotency_key: str | None = None,
    opened_by: str | None = None,
) -> int:
    """Create a stream whose first pull, ``pull``, carries no batch.

    ``idempotency_key``: the start's Idempotency-Key, by which a repeat finds the stream;
    ``opened_by``: the process opening it ("host:pid"), for the console.
    """
    params = {"ispb": ispb, "pull": pull, "key": idempotency_key, "opened_by": opened_by}
    (stream_id,) = _run(conn, "insert_stream", params).fetchone()
    _run(conn, "insert_pull", {"pull": pull, "stream_id": stream_id, "size": 0, "confirmed": True})
    return int(stream_id)


def find_keyed_stream(
    conn: psycopg.Connection, ispb: str, idempotency_key: str
) -> tuple[int, str] | None:
    """(id, first pull) of ``ispb``'s open stream started with ``idempotency_key``, or None.

    Call it holding lock_ispb: no other start of the ISPB opens a stream meanwhile.
    """
    row = _run(conn, "find_keyed_stream", {"ispb": ispb, "key": idempotency_key}).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def lock_stream(conn: psycopg.Connection, pull: str, *, idle_seconds: float) -> StreamRow | None:
    """Lock the stream that issued ``pull``; None when no stream did.

    The row is the stream's newest version even when a concurrent request
    moved it on while this one waited for the lock (see the query's comment).
    """
    row = _run(conn, "lock_stream_by_pull", {"pull": pull, "idle_seconds": idle_seconds}).fetchone()
    return None if row is None else StreamRow(*row)


def confirm_pull(conn: psycopg.Connection, pull: str) -> int:
    """Confirm the batch delivered with ``pull``; the count of messages it held."""
    row = _run(conn, "confirm_pull", {"pull": pull}).fetchone()
    return 0 if row is None else int(row[0])


def confirm_claim_advance(
    conn: psycopg.Connection,
    ispb: str,
    *,
    stream_id: int,
    used: str,
    pull: str,
    limit: int,
    answer_in: float,
) -> Read:
    """Confirm ``used``, claim up to ``limit`` messages under ``pull``, move the stream on.

    One round trip: a read's cost is its round trips (see the statement's comment).
    """
    params = {"ispb": ispb, "stream_id": stream_id, "used": used, "pull": pull,
              "limit": limit, "answer_in": answer_in}  # fmt: skip
    rows = _run(conn, "confirm_claim_advance", params).fetchall()
    documents = [doc for doc, _, _ in rows if doc is not None]
    redelivered = sum(1 for doc, again, _ in rows if doc is not None and again)
    return Read(Claimed(documents, redelivered), int(rows[0][2] or 0))


def batch_documents(conn: psycopg.Connection, pull: str) -> list[str]:
    return [doc for (doc,) in _run(conn, "batch_documents", {"pull": pull})]


def touch_stream(conn: psycopg.Connection, stream_id: int) -> None:
    """Record a request on the stream: it is not idle."""
    _run(conn, "touch_stream", {"stream_id": stream_id})


def touch_quiet_streams(conn: psycopg.Connection, owed: Sequence[tuple[int, str, float]]) -> None:
    """Record requests answered without a transaction: (stream id, pull id, seconds until due).

    A stream that moved past that pull, closed, or is locked by a request
    writing its own last-seen time right now, is left as it is.
    """
    ids, pulls, ahead = zip(*owed, strict=True) if owed else ((), (), ())
    _run(conn, "touch_quiet_streams", {"ids": list(ids), "pulls": list(pulls),
                                       "ahead": list(ahead)})  # fmt: skip


def streams_moved_on(conn: psycopg.Connection, pulls: Mapping[int, str]) -> list[int]:
    """Of these streams (id -> pull id), those closed or no longer at that pull."""
    rows = _run(conn, "streams_moved_on", {"ids": list(pulls), "pulls": list(pulls.values())})
    return [int(stream_id) for (stream_id,) in rows]


def close_stream(conn: psycopg.Connection, stream_id: int, pull: str) -> None:
    """Close the stream on a DELETE made with ``pull``."""
    _run(conn, "close_stream", {"stream_id": stream_id, "pull": pull})


def release_pull(conn: psycopg.Connection, pull: str) -> int:
    """Return an unconfirmed batch to the queue; the count of messages released."""
    return int(_run(conn, "release_pull", {"pull": pull}).fetchone()[0])


def expire_idle_streams(
    conn: psycopg.Connection, *, idle_seconds: float, ispb: str | None = None
) -> list[ExpiredStream]:
    """Expire the idle streams of ``ispb`` (of every ISPB when None).

    One statement per case, each with a generic plan of its own (see queries.sql).
    """
    if ispb is None:
        rows = _run(conn, "expire_all_idle_streams", {"idle_seconds": idle_seconds})
    else:
        params = {"ispb": ispb, "idle_seconds": idle_seconds}
        rows = _run(conn, "expire_idle_streams_of_ispb", params)
    return [ExpiredStream(int(id_), ispb_, int(released)) for id_, ispb_, released in rows]


def notify_ispbs(conn: psycopg.Connection, ispbs: Iterable[str]) -> None:
    """Wake the readers of ``ispbs`` once this transaction commits."""
    _run(conn, "notify_ispbs", {"ispbs": sorted(set(ispbs))})


def notify_streams_closed(conn: psycopg.Connection, stream_ids: Iterable[int]) -> None:
    """Tell every process, once this transaction commits, that these streams are closed."""
    _run(conn, "notify_streams_closed", {"ids": sorted(set(stream_ids))})


def copy_messages(conn: psycopg.Connection, rows: Iterable[Sequence[Any]]) -> int:
    """COPY rows (in ``generator.COLUMNS`` order) into pix_message; the count written."""
    count = 0
    with conn.cursor().copy(QUERIES["copy_messages"]) as copy:  # type: ignore[arg-type]
        for row in rows:
            copy.write_row(row)
            count += 1
    return count


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """A credential as access.py validates it: revoked and expired ones too."""

    id: int
    ispb: str | None
    kind: str
    admin: bool
    label: str
    secret_hash: bytes
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CredentialRecord:
    """A credential as listed: every column but the hash's meaning is for people."""

    id: int
    ispb: str | None
    kind: str
    admin: bool
    label: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    secret_hash: bytes
    subject: str | None


def insert_credential(
    conn: psycopg.Connection,
    *,
    ispb: str | None,
    kind: str,
    admin: bool,
    label: str,
    secret_hash: bytes,
    subject: str | None = None,
    expires_at: datetime | None = None,
) -> CredentialRecord:
    """Store a credential (its hash only); raises psycopg.errors.UniqueViolation on a repeat."""
    row = _run(conn, "insert_credential", {"ispb": ispb, "kind": kind, "admin": admin,
                                           "label": label, "secret_hash": secret_hash,
                                           "subject": subject, "expires_at": expires_at}
               ).fetchone()  # fmt: skip
    return CredentialRecord(*row)


def find_credential_by_hash(conn: psycopg.Connection, secret_hash: bytes) -> CredentialRow | None:
    """The credential with this hash, usable or not; None when there is none."""
    row = _run(conn, "find_credential_by_hash", {"secret_hash": secret_hash}).fetchone()
    return None if row is None else CredentialRow(*row)


def get_credential(conn: psycopg.Connection, credential_id: int) -> CredentialRecord | None:
    row = _run(conn, "get_credential", {"id": credential_id}).fetchone()
    return None if row is None else CredentialRecord(*row)


def list_credentials(
    conn: psycopg.Connection, *, ispb: str | None = None, kind: str | None = None
) -> list[CredentialRecord]:
    """Every credential (``ispb`` None: administrators included) or one ISPB's, oldest first."""
    if ispb is None:
        rows = _run(conn, "list_credentials", {"kind": kind})
    else:
        rows = _run(conn, "list_credentials_of_ispb", {"ispb": ispb, "kind": kind})
    return [CredentialRecord(*row) for row in rows]


def revoke_credential(conn: psycopg.Connection, credential_id: int) -> bool:
    """Revoke (idempotently); False when no credential has this id."""
    return _run(conn, "revoke_credential", {"id": credential_id}).fetchone() is not None


def touch_last_used(conn: psycopg.Connection, ids: Iterable[int], used_at: datetime) -> None:
    """Record that the credentials ``ids`` were used (by 'used_at'), in one statement."""
    _run(conn, "touch_credentials", {"ids": sorted(set(ids)), "used_at": used_at})


# Limits (streams.py)


def _milliseconds(seconds: float | None) -> str:
    """A duration as PostgreSQL settings take it; None (no limit) is 0."""
    return "0" if seconds is None else f"{max(1, round(seconds * 1000))}ms"


def set_session_limits(
    conn: psycopg.Connection,
    *,
    lock: float | None,
    statement: float | None,
    idle_in_transaction: float | None,
) -> None:
    """Bound this session's lock waits, statements and idle transactions (seconds; None: none)."""
    params = {
        "lock_timeout": _milliseconds(lock),
        "statement_timeout": _milliseconds(statement),
        "idle_timeout": _milliseconds(idle_in_transaction),
    }
    _run(conn, "set_session_limits", params)


def set_local_statement_timeout(conn: psycopg.Connection, seconds: float | None) -> None:
    """Bound the statements of this transaction only (None: no limit)."""
    _run(conn, "set_local_statement_timeout", {"timeout": _milliseconds(seconds)})


@dataclass(frozen=True, slots=True)
class Purged:
    """What one retention batch removed."""

    messages: int = 0
    pulls: int = 0
    streams: int = 0

    def __add__(self, other: Purged) -> Purged:
        return Purged(
            self.messages + other.messages, self.pulls + other.pulls, self.streams + other.streams
        )


def lock_retention(conn: psycopg.Connection) -> bool:
    """Take the retention lock until this transaction ends; False if another holds it."""
    return bool(_run(conn, "lock_retention").fetchone()[0])


def purge_confirmed_messages(
    conn: psycopg.Connection, retention_seconds: float, limit: int, after_id: int = 0
) -> tuple[Purged, int | None]:
    """Remove up to ``limit`` messages (ids above ``after_id``) confirmed longer ago than
    the retention, and the pulls they empty; and the last id removed (None: no more).

    The database's clock decides, not the hosts'.
    """
    params = {"retention_seconds": retention_seconds, "limit": limit, "after_id": after_id}
    messages, pulls, last = _run(conn, "purge_confirmed_messages", params).fetchone()
    return Purged(int(messages), int(pulls)), None if last is None else int(last)


def purge_closed_streams(conn: psycopg.Connection, retention_seconds: float, limit: int) -> Purged:
    """Remove up to ``limit`` streams closed longer ago than the retention, with their
    pulls and messages."""
    params = {"retention_seconds": retention_seconds, "limit": limit}
    row = _run(conn, "purge_closed_streams", params).fetchone()
    return Purged(int(row[0]), int(row[1]), int(row[2]))


# --------------------------------------------------------------------------- console


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """One server process's last heartbeat (pix_process)."""

    id: str
    host: str
    pid: int
    started_at: datetime
    silent_for: float  # seconds since its last heartbeat, by the database's clock
    listener_connected: bool
    listener_reconnects: int
    waiting: int
    rate_429: float
    rate_503: float


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream as the console shows it."""

    id: int
    current_pull: str
    opened_at: datetime
    last_or_closed_at: datetime  # last request while open; the close time once closed
    opened_by: str | None
    batch: int  # held (open) or given back (closed), unconfirmed messages
    close_reason: str | None = None


def heartbeat(
    conn: psycopg.Connection,
    *,
    id: str,
    host: str,
    pid: int,
    started_at: datetime,
    listener_connected: bool,
    listener_reconnects: int,
    waiting: int,
    rate_429: float,
    rate_503: float,
) -> None:
    """Record that this process is alive (and forget processes silent for a day)."""
    _run(conn, "heartbeat", {"id": id, "host": host, "pid": pid, "started_at": started_at,
                             "listener_connected": listener_connected,
                             "listener_reconnects": listener_reconnects, "waiting": waiting,
                             "rate_429": rate_429, "rate_503": rate_503})  # fmt: skip


def list_processes(conn: psycopg.Connection) -> list[ProcessRow]:
    return [ProcessRow(*row) for row in _run(conn, "list_processes")]


def queued_by_ispb(conn: psycopg.Connection) -> list[tuple[str, int, datetime]]:
    """(ISPB, queued messages, the oldest one's insertion time) per ISPB with a queue."""
    return [(str(i), int(n), t) for i, n, t in _run(conn, "queued_by_ispb")]


def in_flight_by_ispb(conn: psycopg.Connection) -> list[tuple[str, int, datetime]]:
    """(ISPB, delivered but unconfirmed messages, the oldest one's insertion time)."""
    return [(str(i), int(n), t) for i, n, t in _run(conn, "in_flight_by_ispb")]


def open_streams_by_ispb(conn: psycopg.Connection) -> list[tuple[str, int, datetime]]:
    """(ISPB, open streams, latest request on one of them)."""
    return [(str(i), int(n), t) for i, n, t in _run(conn, "open_streams_by_ispb")]


def recent_activity_by_ispb(
    conn: psycopg.Connection, seconds: float
) -> list[tuple[str, int, int, datetime]]:
    """(ISPB, delivered, given back, latest delivery) over the last ``seconds``."""
    rows = _run(conn, "recent_activity_by_ispb", {"seconds": seconds})
    return [(str(i), int(d), int(g), t) for i, d, g, t in rows]


def inserted_per_bucket(conn: psycopg.Connection, seconds: int, bucket: int) -> dict[int, int]:
    """Messages inserted per bucket, keyed by how many buckets ago (0: the current one)."""
    rows = _run(conn, "inserted_per_bucket", {"seconds": seconds, "bucket": bucket})
    return {int(ago): int(count) for ago, count in rows}


def pulls_per_bucket(
    conn: psycopg.Connection, seconds: int, bucket: int
) -> dict[int, tuple[int, int]]:
    """(delivered, confirmed) messages per bucket, keyed by how many buckets ago."""
    rows = _run(conn, "pulls_per_bucket", {"seconds": seconds, "bucket": bucket})
    return {int(ago): (int(d), int(c)) for ago, d, c in rows}


def open_streams_of_ispb(conn: psycopg.Connection, ispb: str) -> list[StreamInfo]:
    return [StreamInfo(*row) for row in _run(conn, "open_streams_of_ispb", {"ispb": ispb})]


def closed_streams_of_ispb(conn: psycopg.Connection, ispb: str, limit: int) -> list[StreamInfo]:
    """The latest ``limit`` closed streams of ``ispb``, newest first."""
    rows = _run(conn, "closed_streams_of_ispb", {"ispb": ispb, "limit": limit})
    return [StreamInfo(i, p, o, c, by, n, reason) for i, p, o, c, reason, by, n in rows]


def expire_stream(conn: psycopg.Connection, ispb: str, stream_id: int) -> ExpiredStream | None:
    """Close one open stream of ``ispb`` as an expiry would; None when it is not open.

    Two statements: the lock, then the expiry, which then sees the stream's
    current pull as it is once locked (see lock_open_stream).
    """
    params = {"ispb": ispb, "stream_id": stream_id}
    if _run(conn, "lock_open_stream", params).fetchone() is None:
        return None
    row = _run(conn, "expire_stream", params).fetchone()
    return None if row is None else ExpiredStream(int(row[0]), row[1], int(row[2]))
