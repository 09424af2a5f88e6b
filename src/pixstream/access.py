"""Credentials: who is calling, without a database round trip per request.

A credential is a bearer token or a client certificate, bound to one ISPB (or,
a token only, to an administrator). Both are stored in PostgreSQL, so every
host sees the same set, as a SHA-256: of the token, or of the certificate's
DER encoding (its fingerprint). A token is 256 random bits, shown once.

Each process caches the credentials it validated, keyed by that hash. A cached
entry answers without a query for up to ``cache_seconds`` as long as the
process's LISTEN connection has been up since the entry was validated: any
change to a credential (revocation above all) is announced on
``pix_credentials`` and drops it from every host's cache within milliseconds.
While the listener is down, or once it reconnected (notifications may have
been lost), an entry is trusted for ``unlistened_seconds`` (1 s) at most, and
the reconnection empties the cache. A revoked credential thus stops working
everywhere within one second, whatever the listener's state.

Refusals are cached for ``negative_seconds`` (2 s) only, and dropped by any
credential notification: a client repeating a dead token costs a query every
two seconds, not one per request, and a certificate registered right after it
was refused works at once. Random unknown tokens cannot be cached; their
lookups are bounded instead (``max_lookups`` at a time per process), so a
flood of them occupies that many pool connections and no more. Simultaneous
checks of one credential the cache does not hold (the six collectors of a
bank reconnecting at once after a deploy) share one lookup.

Only ``threading`` primitives are used (monkey-patched into greenlet ones
under gevent); the cache is a pair of dicts behind one lock.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from psycopg_pool import ConnectionPool

from pixstream import db, store
from pixstream.errors import DatabaseUnavailable, InvalidRequest, PixstreamError
from pixstream.listener import CREDENTIALS_CHANNEL, Listener
from pixstream.validation import parse_ispb

log = logging.getLogger(__name__)

TOKEN_PREFIX = "pxs_"  # makes a leaked token recognisable to secret scanners
_MAX_TOKEN_LENGTH = 256  # longer is not ours: refused without a query
_MAX_CERTIFICATE_BYTES = 64 * 1024
_MAX_LABEL_LENGTH = 200
_MAX_REFUSALS = 10_000  # negative cache entries kept before it is emptied
_TOUCH_SECONDS = 60.0  # last_used_at is written at most this often per credential
_FLUSH_SECONDS = 5.0  # how often the pending last_used_at writes are flushed

_REASONS = {
    "unknown": "the credential is not known",
    "revoked": "the credential was revoked",
    "expired": "the credential has expired",
    "malformed": "the client certificate could not be parsed",
}


class CredentialRejected(PixstreamError):
    """The request carries a credential that grants nothing.

    ``reason`` is "unknown", "revoked", "expired" or (BadCertificate only)
    "malformed", for RFC 6750's error_description; the message never holds
    the secret.
    """

    status = 401
    title = "Unauthorized"

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(detail or _REASONS[reason])
        self.reason = reason


class BadCertificate(CredentialRejected):
    """The client certificate is neither a PEM nor a DER X.509 certificate."""

    def __init__(self, detail: str | None = None) -> None:
        super().__init__("malformed", detail)


class DuplicateCredential(PixstreamError):
    """This certificate is registered already (certificates are unique by fingerprint)."""

    status = 409
    title = "Credential exists"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from, as its credential says."""

    credential_id: int
    ispb: str | None  # None for an administrator
    admin: bool
    kind: str  # "token" | "cert"
    label: str

    def may_access(self, ispb: str) -> bool:
        """True when this principal may read and confirm ``ispb``'s payments.

        An administrator may not: it runs the util routes, it does not collect.
        """
        return not self.admin and self.ispb == ispb


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """A credential as people see it: never the secret."""

    id: int
    ispb: str | None
    kind: str
    admin: bool
    label: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    fingerprint: str | None  # certificates: SHA-256 of the DER encoding, hex
    subject: str | None  # certificates: RFC 4514 subject

    @classmethod
    def from_record(cls, record: store.CredentialRecord) -> CredentialInfo:
        return cls(
            id=record.id,
            ispb=record.ispb,
            kind=record.kind,
            admin=record.admin,
            label=record.label,
            created_at=record.created_at,
            last_used_at=record.last_used_at,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            fingerprint=record.secret_hash.hex() if record.kind == "cert" else None,
            subject=record.subject,
        )


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    secret_hash: bytes
    expires_at: float | None  # seconds since the epoch
    cached_at: float  # time.monotonic()
    generation: int | None  # the listener's connection when validated; None: not listening


@dataclass(frozen=True, slots=True)
class _Refusal:
    reason: str
    cached_at: float


class _Flight:
    """One lookup in progress, and what it found (a principal or the error to raise)."""

    __slots__ = ("done", "followers", "outcome")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.followers = 0  # checks waiting for this lookup instead of making their own
        self.outcome: Principal | PixstreamError | None = None


def token_hash(token: str) -> bytes:
    """What a token is stored and looked up as."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_certificate(data: bytes) -> x509.Certificate:
    """Parse a PEM or DER certificate; BadCertificate when it is neither."""
    if not data or len(data) > _MAX_CERTIFICATE_BYTES:
        raise BadCertificate()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise BadCertificate() from exc


def certificate_fingerprint(certificate: x509.Certificate) -> bytes:
    """SHA-256 of the DER encoding: what a certificate is registered and found by."""
    return certificate.fingerprint(hashes.SHA256())


class AccessService:
    """Create, list and revoke credentials; authenticate requests from a per-process cache."""

    def __init__(
        self,
        pool: ConnectionPool,
        listener: Listener | None,
        *,
        cache_seconds: float = 30.0,
        unlistened_seconds: float = 1.0,
        negative_seconds: float = 2.0,
        max_lookups: int = 3,
    ) -> None:
        self._pool = pool
        self._listener = listener
        self._cache_seconds = cache_seconds
        self._unlistened_seconds = min(unlistened_seconds, cache_seconds)
        self._negative_seconds = negative_seconds
        self._lock = threading.Lock()
        self._cache: dict[bytes, _Entry] = {}
        self._hash_of: dict[int, bytes] = {}  # credential id -> its cache key
        self._refused: dict[bytes, _Refusal] = {}
        # Bumped by every invalidation: a lookup that began before one does not
        # cache its (maybe stale) answer.
        self._epoch = 0
        self._lookups = threading.BoundedSemaphore(max_lookups)
        self._flights: dict[tuple[bytes, str], _Flight] = {}
        self._touched: dict[int, float] = {}  # credential id -> when last marked used
        self._pending: dict[int, datetime] = {}  # credential id -> last use, not yet written
        self._closing = threading.Event()
        self._flusher: threading.Thread | None = None
        if listener is not None:
            listener.on_notify(CREDENTIALS_CHANNEL, self._invalidate)
            listener.on_reconnect(self.clear_cache)

    # ------------------------------------------------------------------ authentication

    def authenticate_token(self, token: str) -> Principal:
        """The principal a bearer token stands for; CredentialRejected otherwise."""
        if not token or len(token) > _MAX_TOKEN_LENGTH or not token.isascii():
            raise CredentialRejected("unknown")
        return self._authenticate(token_hash(token), "token")

    def authenticate_certificate(self, pem_or_der: bytes) -> Principal:
        """The principal a client certificate (PEM or DER) stands for.

        BadCertificate (a CredentialRejected, reason "malformed") when it does
        not parse; CredentialRejected "unknown", "revoked" or "expired"
        otherwise. Registered certificates expire with their notAfter.
        """
        certificate = load_certificate(pem_or_der)
        return self._authenticate(certificate_fingerprint(certificate), "cert")

    def _authenticate(self, digest: bytes, kind: str) -> Principal:
        now = time.monotonic()
        with self._lock:
            entry = self._cache.get(digest)
            refusal = self._refused.get(digest)
        if entry is not None and self._trusted(entry, now):
            # The dict lookup matched on the hash already; this says so in constant time.
            if entry.principal.kind != kind or not hmac.compare_digest(entry.secret_hash, digest):
                raise CredentialRejected("unknown")
            if entry.expires_at is not None and time.time() >= entry.expires_at:
                raise CredentialRejected("expired")
            self._mark_used(entry.principal.credential_id, now)
            return entry.principal
        if refusal is not None and now - refusal.cached_at < self._negative_seconds:
            raise CredentialRejected(refusal.reason)
        return self._lookup(digest, kind)

    def _trusted(self, entry: _Entry, now: float) -> bool:
        """Whether a cached entry may answer without the database."""
        age = now - entry.cached_at
        if age >= self._cache_seconds:
            return False
        if age < self._unlistened_seconds:
            return True
        listening = None if self._listener is None else self._listener.listening_generation()
        return listening is not None and listening == entry.generation

    def _lookup(self, digest: bytes, kind: str) -> Principal:
        """Ask the database, or wait for the same question already asked (single flight)."""
        with self._lock:
            flight = self._flights.get((digest, kind))
            leader = flight is None
            if flight is None:
                flight = self._flights[digest, kind] = _Flight()
            else:
                flight.followers += 1
        if not leader:
            if not flight.done.wait(self._pool.timeout):
                raise DatabaseUnavailable("the credential check took too long")
            outcome = flight.outcome
            if isinstance(outcome, Principal):
                self._mark_used(outcome.credential_id, time.monotonic())
                return outcome
            raise copy.copy(outcome) if outcome is not None else DatabaseUnavailable()
        try:
            principal = self._query(digest, kind)
            flight.outcome = principal
            return principal
        except (CredentialRejected, DatabaseUnavailable) as exc:
            flight.outcome = exc
            raise
        finally:
            with self._lock:
                del self._flights[digest, kind]
            flight.done.set()

    def _query(self, digest: bytes, kind: str) -> Principal:
        # Both read before the query: an invalidation or reconnection that
        # lands while it runs makes its answer uncacheable or untrusted.
        with self._lock:
            epoch = self._epoch
        generation = None if self._listener is None else self._listener.listening_generation()
        if not self._lookups.acquire(timeout=self._pool.timeout):
            raise DatabaseUnavailable("too many credential checks at once")
        try:
            with db.transaction(self._pool) as conn:
                row = store.find_credential_by_hash(conn, digest)
        finally:
            self._lookups.release()
        now = time.monotonic()
        reason = self._refusal_reason(row, digest, kind)
        if reason is None:
            assert row is not None
            principal = Principal(row.id, row.ispb, row.admin, row.kind, row.label)
            expires_at = None if row.expires_at is None else row.expires_at.timestamp()
            with self._lock:
                if self._epoch == epoch:
                    old = self._hash_of.pop(row.id, None)
                    if old is not None:
                        self._cache.pop(old, None)
                    self._cache[digest] = _Entry(principal, digest, expires_at, now, generation)
                    self._hash_of[row.id] = digest
                    self._refused.pop(digest, None)
            self._mark_used(row.id, now)
            return principal
        with self._lock:
            if self._epoch == epoch:
                if len(self._refused) >= _MAX_REFUSALS:
                    self._refused.clear()
                self._refused[digest] = _Refusal(reason, now)
        raise CredentialRejected(reason)

    @staticmethod
    def _refusal_reason(row: store.CredentialRow | None, digest: bytes, kind: str) -> str | None:
        if row is None or row.kind != kind or not hmac.compare_digest(row.secret_hash, digest):
            return "unknown"
        if row.revoked_at is not None:
            return "revoked"
        if row.expires_at is not None and row.expires_at <= datetime.now(UTC):
            return "expired"
        return None

    # ------------------------------------------------------------------ cache invalidation

    def _invalidate(self, payload: str) -> None:
        """A credential changed (a pix_credentials notification, or a local revoke)."""
        try:
            credential_id = int(payload)
        except ValueError:
            self.clear_cache()
            return
        with self._lock:
            self._epoch += 1
            digest = self._hash_of.pop(credential_id, None)
            if digest is not None:
                self._cache.pop(digest, None)
            # A refusal may be out of date now (a credential was just created).
            self._refused.clear()

    def clear_cache(self) -> None:
        """Forget every cached answer (the listener reconnected: notifications were lost)."""
        with self._lock:
            self._epoch += 1
            self._cache.clear()
            self._hash_of.clear()
            self._refused.clear()

    def cached_ids(self) -> set[int]:
        """The ids of the credentials cached now (for tests and diagnostics)."""
        with self._lock:
            return set(self._hash_of)

    # ------------------------------------------------------------------ last use

    def _mark_used(self, credential_id: int, now: float) -> None:
        """Remember a use; written by the flusher, at most once a minute per credential."""
        with self._lock:
            last = self._touched.get(credential_id)
            if last is not None and now - last < _TOUCH_SECONDS:
                return
            self._touched[credential_id] = now
            self._pending[credential_id] = datetime.now(UTC)
            start = self._flusher is None and not self._closing.is_set()
            if start:
                self._flusher = threading.Thread(
                    target=self._flush_forever, name="pixstream-credentials", daemon=True
                )
        if start and self._flusher is not None:
            self._flusher.start()

    def _flush_forever(self) -> None:
        while not self._closing.wait(_FLUSH_SECONDS):
            self.flush_last_used()

    def flush_last_used(self, timeout: float | None = None) -> int:
        """Write the pending last-used times in one statement; how many were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            with db.transaction(self._pool, timeout=timeout) as conn:
                store.touch_last_used(conn, pending, max(pending.values()))
        except (DatabaseUnavailable, psycopg.Error) as exc:
            log.warning("credential last-use times not written: %s", exc)
            with self._lock:
                for credential_id, used_at in pending.items():
                    self._pending.setdefault(credential_id, used_at)
            return 0
        return len(pending)

    def close(self) -> None:
        """Stop the flusher after a last, short flush."""
        self._closing.set()
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout=2)
            self.flush_last_used(timeout=1)

    # ------------------------------------------------------------------ management

    def create_token(
        self,
        ispb: str | None,
        label: str = "",
        *,
        admin: bool = False,
        expires_days: float | None = None,
    ) -> tuple[CredentialInfo, str]:
        """A new token for ``ispb`` (or an administrator's); the token is returned only here."""
        if admin:
            if ispb is not None:
                raise InvalidRequest("an administrator token belongs to no ISPB")
        elif ispb is None:
            raise InvalidRequest("a token needs an ISPB (or admin)")
        else:
            ispb = parse_ispb(ispb)
        label = _check_label(label)
        expires_at = None
        if expires_days is not None:
            if not math.isfinite(expires_days) or expires_days <= 0:
                raise InvalidRequest(f"expiry must be a positive number of days: {expires_days}")
            expires_at = datetime.now(UTC) + timedelta(days=expires_days)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with db.transaction(self._pool) as conn:
            record = store.insert_credential(
                conn, ispb=ispb, kind="token", admin=admin, label=label,
                secret_hash=token_hash(token), expires_at=expires_at,
            )  # fmt: skip
        log.info("created token credential %d for %s", record.id, ispb or "an administrator")
        return CredentialInfo.from_record(record), token

    def add_certificate(self, ispb: str, pem: bytes, label: str = "") -> CredentialInfo:
        """Register a client certificate of ``ispb``; it expires with its notAfter."""
        ispb = parse_ispb(ispb)
        label = _check_label(label)
        certificate = load_certificate(pem)
        not_after = certificate.not_valid_after_utc
        if not_after <= datetime.now(UTC):
            raise InvalidRequest(f"the certificate expired on {not_after.isoformat()}")
        try:
            with db.transaction(self._pool) as conn:
                record = store.insert_credential(
                    conn, ispb=ispb, kind="cert", admin=False, label=label,
                    secret_hash=certificate_fingerprint(certificate),
                    subject=certificate.subject.rfc4514_string(), expires_at=not_after,
                )  # fmt: skip
        except psycopg.errors.UniqueViolation as exc:
            raise DuplicateCredential("this certificate is registered already") from exc
        log.info("registered certificate credential %d for %s", record.id, ispb)
        return CredentialInfo.from_record(record)

    def get_credential(self, credential_id: int) -> CredentialInfo | None:
        with db.transaction(self._pool) as conn:
            record = store.get_credential(conn, credential_id)
        return None if record is None else CredentialInfo.from_record(record)

    def list_credentials(
        self, ispb: str | None = None, *, kind: str | None = None
    ) -> list[CredentialInfo]:
        """Every credential (``ispb`` None: administrators too) or one ISPB's, oldest first."""
        if ispb is not None:
            ispb = parse_ispb(ispb)
        with db.transaction(self._pool) as conn:
            records = store.list_credentials(conn, ispb=ispb, kind=kind)
        return [CredentialInfo.from_record(record) for record in records]

    def revoke(self, credential_id: int) -> bool:
        """Revoke a credential everywhere (idempotent); False when there is no such id.

        The commit notifies every host; this process drops it at once too.
        """
        with db.transaction(self._pool) as conn:
            existed = store.revoke_credential(conn, credential_id)
        if existed:
            self._invalidate(str(credential_id))
            log.info("revoked credential %d", credential_id)
        return existed


def _check_label(label: str) -> str:
    if len(label) > _MAX_LABEL_LENGTH or not label.isprintable():
        raise InvalidRequest(
            f"a label is at most {_MAX_LABEL_LENGTH} printable characters, got {label!r}"
        )
    return label
