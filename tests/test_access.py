"""The access service: credentials in PostgreSQL, a per-process cache invalidated
through LISTEN pix_credentials, and no query per request once a credential is cached.

Every "host" here is what a server process has: its own pool and its own
Listener on the test database.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg.conninfo import make_conninfo
from psycopg_pool import ConnectionPool

import pixstream.access
from _streamkit import new_ispb, wait_for
from pixstream import db as pixdb
from pixstream.access import (
    TOKEN_PREFIX,
    AccessService,
    BadCertificate,
    CredentialInfo,
    CredentialRejected,
    DuplicateCredential,
    Principal,
)
from pixstream.errors import DatabaseUnavailable, InvalidRequest
from pixstream.listener import CREDENTIALS_CHANNEL, Listener

# ------------------------------------------------------------------ certificates


@dataclass
class Issued:
    """A certificate the tests made, with its encodings."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pixstream tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "pixstream test CA") -> Issued:
    """A self-signed certificate authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def make_client_cert(ca: Issued, common_name: str, *, not_after: datetime | None = None) -> Issued:
    """A client certificate signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_after = not_after or now + timedelta(days=10)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, not_after) - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(certificate, key)


# ------------------------------------------------------------------ hosts


@dataclass
class Host:
    """What one server process has: a pool, a listener, an access service."""

    pool: ConnectionPool
    listener: Listener | None
    access: AccessService
    app_name: str
    notified: list[str]

    def settle(self, *credential_ids: int) -> None:
        """Wait until this host heard of the creation of ``credential_ids``.

        That notification drops the id from the cache (harmlessly) whenever it
        arrives; tests that count queries let it arrive first.
        """
        wait_for(
            lambda: {str(i) for i in credential_ids} <= set(self.notified),
            timeout=2,
            what=f"notifications of {credential_ids}",
        )

    def requests(self) -> int:
        """Connections lent by the pool so far: every query of the service takes one."""
        return int(self.pool.get_stats().get("requests_num", 0))


@pytest.fixture
def make_host(database_url: str) -> Iterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def factory(*, listening: bool = True, **options: float) -> Host:
        app_name = f"pixstream-acc-{secrets.token_hex(4)}"
        conninfo = make_conninfo(database_url, application_name=app_name)
        pool = pixdb.make_pool(conninfo, max_size=4, timeout=3)
        pool.open(wait=True)
        listener = None
        notified: list[str] = []
        if listening:
            listener = Listener(conninfo, probe_seconds=1.0, max_backoff_seconds=0.2)
            listener.start()
            assert listener.wait_connected(5)
        access = AccessService(pool, listener, **options)
        if listener is not None:
            listener.on_notify(CREDENTIALS_CHANNEL, notified.append)  # after access's own
        host = Host(pool, listener, access, app_name, notified)
        hosts.append(host)
        return host

    yield factory
    for host in hosts:
        host.access.close()
        if host.listener is not None:
            host.listener.stop()
        host.pool.close(timeout=1)


@pytest.fixture
def host(make_host: Callable[..., Host]) -> Host:
    return make_host()


def reason_of(call: Callable[[], object]) -> str | None:
    """The CredentialRejected reason ``call`` raises; None when it succeeds."""
    try:
        call()
    except CredentialRejected as exc:
        return exc.reason
    return None


# ------------------------------------------------------------------ tokens


def test_token_round_trip_and_only_hash_stored(host: Host, db: psycopg.Connection) -> None:
    ispb = new_ispb()
    info, token = host.access.create_token(ispb, "primary collector")
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) == len(TOKEN_PREFIX) + 43  # 32 random bytes, URL-safe base64
    assert (info.ispb, info.kind, info.admin, info.label) == (
        ispb,
        "token",
        False,
        "primary collector",
    )
    assert info.revoked_at is None and info.expires_at is None and info.fingerprint is None

    principal = host.access.authenticate_token(token)
    assert principal == Principal(info.id, ispb, False, "token", "primary collector")
    assert principal.may_access(ispb) and not principal.may_access(new_ispb())

    row = db.execute("SELECT * FROM pix_credential WHERE id = %s", (info.id,)).fetchone()
    assert row is not None
    assert hashlib.sha256(token.encode()).digest() in row
    assert not any(token in str(value) for value in row), "the token itself is stored"
    # Two tokens are never the same.
    assert host.access.create_token(ispb)[1] != token


def test_admin_tokens_and_invalid_requests(host: Host) -> None:
    info, token = host.access.create_token(None, "ops", admin=True)
    principal = host.access.authenticate_token(token)
    assert principal.admin and principal.ispb is None and info.admin
    assert not principal.may_access(new_ispb()), "an administrator reads no ISPB's payments"
    with pytest.raises(InvalidRequest):
        host.access.create_token(new_ispb(), admin=True)
    with pytest.raises(InvalidRequest):
        host.access.create_token(None)
    with pytest.raises(InvalidRequest, match="8 digits"):
        host.access.create_token("1234")
    with pytest.raises(InvalidRequest):
        host.access.create_token(new_ispb(), expires_days=0)
    with pytest.raises(InvalidRequest):
        host.access.create_token(new_ispb(), "a\nlabel")


def test_unknown_revoked_expired_reasons(host: Host, db: psycopg.Connection) -> None:
    ispb = new_ispb()
    assert reason_of(lambda: host.access.authenticate_token(TOKEN_PREFIX + "x" * 43)) == "unknown"
    for junk in ("", "é" * 10, "x" * 10_000):
        assert reason_of(lambda junk=junk: host.access.authenticate_token(junk)) == "unknown"

    revoked, revoked_token = host.access.create_token(ispb)
    host.access.authenticate_token(revoked_token)
    assert host.access.revoke(revoked.id) is True
    assert reason_of(lambda: host.access.authenticate_token(revoked_token)) == "revoked"
    assert host.access.revoke(revoked.id) is True, "revoking twice is fine"
    assert host.access.revoke(10**12) is False

    expired, expired_token = host.access.create_token(ispb, expires_days=1)
    db.execute(
        "UPDATE pix_credential SET expires_at = now() - interval '1 second' WHERE id = %s",
        (expired.id,),
    )  # before its first use: no cache to tell
    assert reason_of(lambda: host.access.authenticate_token(expired_token)) == "expired"

    with pytest.raises(CredentialRejected) as error:
        host.access.authenticate_token(revoked_token)
    assert error.value.status == 401
    assert revoked_token not in str(error.value)


def test_expiry_is_checked_from_the_cache_without_a_query(host: Host) -> None:
    info, token = host.access.create_token(new_ispb(), expires_days=1.5 / 86_400)  # 1.5 s
    host.settle(info.id)
    assert host.access.authenticate_token(token).credential_id == info.id
    host.access.flush_last_used()
    before = host.requests()
    wait_for(
        lambda: reason_of(lambda: host.access.authenticate_token(token)) == "expired",
        timeout=5,
        interval=0.05,
        what="the cached token to expire",
    )
    assert host.requests() == before, "expiry needed a query"


def test_no_query_per_request_once_cached(host: Host) -> None:
    ispb = new_ispb()
    info, token = host.access.create_token(ispb)
    host.settle(info.id)
    host.access.authenticate_token(token)
    host.access.flush_last_used()
    before = host.requests()
    for _ in range(500):
        assert host.access.authenticate_token(token).ispb == ispb
    assert host.requests() == before
    # Even without any database connection at all, the cached credential answers.
    host.pool.close(timeout=1)
    assert host.access.authenticate_token(token).ispb == ispb
    with pytest.raises(DatabaseUnavailable):
        host.access.authenticate_token(TOKEN_PREFIX + secrets.token_urlsafe(32))


def test_simultaneous_checks_of_an_uncached_credential_share_one_lookup(
    host: Host, db: psycopg.Connection
) -> None:
    """After a deploy every bank's collectors reconnect at once, each with a token
    no process has cached yet: the checks of one token wait for one lookup."""
    ispb = new_ispb()
    info, token = host.access.create_token(ispb)
    host.settle(info.id)
    host.access.clear_cache()
    before = host.requests()
    checks = 12
    answers: list[object] = []
    with psycopg.connect(db.info.dsn, autocommit=True) as blocker:
        # The first lookup waits on this lock, so that the others come while it runs.
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE pix_credential IN ACCESS EXCLUSIVE MODE")

        def check() -> None:
            try:
                answers.append(host.access.authenticate_token(token).ispb)
            except Exception as exc:  # the test reports what it got
                answers.append(exc)

        threads = [threading.Thread(target=check) for _ in range(checks)]
        for thread in threads:
            thread.start()
        flights = host.access._flights  # the lookups in progress and their followers
        wait_for(
            lambda: sum(f.followers + 1 for f in list(flights.values())) == checks,
            timeout=5, what="every check to wait for the one lookup",
        )  # fmt: skip
        blocker.execute("COMMIT")
    for thread in threads:
        thread.join(10)
    assert answers == [ispb] * checks
    assert host.requests() - before == 1


def test_refusals_are_cached_briefly(make_host: Callable[..., Host]) -> None:
    host = make_host(negative_seconds=1.0)
    unknown = TOKEN_PREFIX + secrets.token_urlsafe(32)
    assert reason_of(lambda: host.access.authenticate_token(unknown)) == "unknown"
    before = host.requests()
    for _ in range(100):
        assert reason_of(lambda: host.access.authenticate_token(unknown)) == "unknown"
    assert host.requests() == before, "a repeated unknown token queried the database"
    wait_for(
        lambda: (
            reason_of(lambda: host.access.authenticate_token(unknown)) == "unknown"
            and host.requests() > before
        ),
        timeout=3,
        interval=0.05,
        what="the refusal to be looked up again",
    )


def test_comparison_is_constant_time(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(pixstream.access.hmac, "compare_digest", spy)
    info, token = host.access.create_token(new_ispb())
    host.settle(info.id)
    digest = hashlib.sha256(token.encode()).digest()
    host.access.authenticate_token(token)  # from the database
    assert (digest, digest) in calls
    calls.clear()
    host.access.authenticate_token(token)  # from the cache
    assert calls == [(digest, digest)]


def test_last_used_written_at_most_once_a_minute(host: Host, db: psycopg.Connection) -> None:
    _, token = host.access.create_token(new_ispb())
    info = host.access.list_credentials()[-1]
    assert info.last_used_at is None
    for _ in range(50):
        host.access.authenticate_token(token)
    assert host.access.flush_last_used() == 1
    (used,) = db.execute(
        "SELECT last_used_at FROM pix_credential WHERE secret_hash = %s",
        (hashlib.sha256(token.encode()).digest(),),
    ).fetchone()  # type: ignore[misc]
    assert used is not None and abs((datetime.now(UTC) - used).total_seconds()) < 60
    for _ in range(50):
        host.access.authenticate_token(token)
    assert host.access.flush_last_used() == 0, "written again within the minute"


def test_list_credentials_never_shows_a_secret(host: Host) -> None:
    ispb, other = new_ispb(), new_ispb()
    mine = [host.access.create_token(ispb, f"t{i}")[0] for i in range(2)]
    host.access.create_token(other)
    admin, _ = host.access.create_token(None, admin=True)
    listed = host.access.list_credentials(ispb)
    assert [c.id for c in listed] == [c.id for c in mine]
    everything = {c.id for c in host.access.list_credentials()}
    assert admin.id in everything and {c.id for c in mine} <= everything
    assert host.access.list_credentials(ispb, kind="cert") == []
    assert {f.name for f in fields(CredentialInfo)}.isdisjoint({"secret_hash", "token", "hash"})
    assert host.access.get_credential(mine[0].id) == mine[0]
    assert host.access.get_credential(10**12) is None


# ------------------------------------------------------------------ certificates


def test_certificate_round_trip(host: Host, db: psycopg.Connection) -> None:
    ca = make_ca()
    ispb = new_ispb()
    client = make_client_cert(ca, f"bank {ispb}")
    info = host.access.add_certificate(ispb, client.pem, "nginx")
    assert info.kind == "cert" and info.fingerprint == client.fingerprint
    assert info.subject is not None and f"CN=bank {ispb}" in info.subject
    assert info.expires_at == client.certificate.not_valid_after_utc

    for encoding in (client.pem, client.der):
        principal = host.access.authenticate_certificate(encoding)
        assert principal == Principal(info.id, ispb, False, "cert", "nginx")

    stranger = make_client_cert(ca, "not registered")
    assert reason_of(lambda: host.access.authenticate_certificate(stranger.pem)) == "unknown"
    with pytest.raises(BadCertificate) as bad:
        host.access.authenticate_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n")
    assert bad.value.reason == "malformed"
    assert reason_of(lambda: host.access.authenticate_certificate(b"\x30\x03abc")) == "malformed"
    with pytest.raises(DuplicateCredential):
        host.access.add_certificate(new_ispb(), client.pem)
    with pytest.raises(BadCertificate):
        host.access.add_certificate(ispb, b"not a certificate")
    lapsed = make_client_cert(ca, "lapsed", not_after=datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(InvalidRequest, match="expired"):
        host.access.add_certificate(ispb, lapsed.pem)

    # A certificate is no token, even if its fingerprint were presented as one.
    assert reason_of(lambda: host.access.authenticate_token(client.fingerprint)) == "unknown"

    with db.transaction():  # by hand, announced by hand (see migration 0004)
        db.execute(
            "UPDATE pix_credential SET expires_at = now() - interval '1 second' WHERE id = %s",
            (info.id,),
        )
        db.execute("SELECT pg_notify('pix_credentials', %s)", (str(info.id),))
    wait_for(
        lambda: reason_of(lambda: host.access.authenticate_certificate(client.pem)) == "expired",
        timeout=1,
        what="the expiry to reach the cache",
    )
    assert host.access.revoke(info.id)
    assert reason_of(lambda: host.access.authenticate_certificate(client.der)) == "revoked"


def test_certificate_registered_after_a_refusal_works_at_once(
    make_host: Callable[..., Host],
) -> None:
    """The brief negative cache is dropped by the creation's notification."""
    host = make_host(negative_seconds=60)
    other = make_host()
    client = make_client_cert(make_ca(), "late")
    assert reason_of(lambda: host.access.authenticate_certificate(client.pem)) == "unknown"
    info = other.access.add_certificate(new_ispb(), client.pem)
    started = time.monotonic()
    wait_for(
        lambda: reason_of(lambda: host.access.authenticate_certificate(client.pem)) is None,
        timeout=1,
        what="the new certificate to be accepted",
    )
    assert time.monotonic() - started < 1
    assert info.id in host.access.cached_ids()


# ------------------------------------------------------------------ revocation across hosts


def test_revocation_reaches_another_host_within_a_second(
    make_host: Callable[..., Host],
) -> None:
    admin_host = make_host()
    serving = make_host(cache_seconds=300)
    ispb = new_ispb()
    info, token = admin_host.access.create_token(ispb)
    client = make_client_cert(make_ca(), "revoked later")
    cert = admin_host.access.add_certificate(ispb, client.pem)
    serving.settle(info.id, cert.id)
    assert serving.access.authenticate_token(token).credential_id == info.id
    assert serving.access.authenticate_certificate(client.pem).credential_id == cert.id
    assert {info.id, cert.id} <= serving.access.cached_ids()

    revoked_at = time.monotonic()
    assert admin_host.access.revoke(info.id)
    assert admin_host.access.revoke(cert.id)
    # The notification, not the backstop, drops them: the cache would hold them 300 s.
    wait_for(
        lambda: not ({info.id, cert.id} & serving.access.cached_ids()),
        timeout=1,
        what="the other host to drop the revoked credentials",
    )
    assert reason_of(lambda: serving.access.authenticate_token(token)) == "revoked"
    assert reason_of(lambda: serving.access.authenticate_certificate(client.der)) == "revoked"
    assert time.monotonic() - revoked_at < 1


def test_revocation_reaches_a_host_without_listener_within_a_second(
    make_host: Callable[..., Host],
) -> None:
    """With its listener down, a host trusts its cache for a second at most."""
    admin_host = make_host()
    deaf = make_host(listening=False, cache_seconds=300)
    info, token = admin_host.access.create_token(new_ispb())
    deaf.access.authenticate_token(token)
    revoked_at = time.monotonic()
    admin_host.access.revoke(info.id)
    wait_for(
        lambda: reason_of(lambda: deaf.access.authenticate_token(token)) == "revoked",
        timeout=1.2,
        interval=0.02,
        what="the deaf host to refuse the revoked token",
    )
    assert time.monotonic() - revoked_at < 1.2


def test_cache_dropped_when_the_listener_reconnects(
    make_host: Callable[..., Host], db: psycopg.Connection
) -> None:
    host = make_host(cache_seconds=300)
    assert host.listener is not None
    info, token = host.access.create_token(new_ispb())
    host.settle(info.id)
    host.access.authenticate_token(token)
    assert info.id in host.access.cached_ids()
    generation = host.listener.generation
    (terminated,) = db.execute(
        "SELECT bool_and(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
        " WHERE application_name = %s AND query IN ('LISTEN pix_inserted', 'SELECT 1')",
        (host.app_name,),
    ).fetchone()  # type: ignore[misc]
    assert terminated
    wait_for(
        lambda: (
            host.listener is not None
            and host.listener.generation > generation
            and host.listener.connected
        ),
        timeout=5,
        what="the listener to reconnect",
    )
    assert host.access.cached_ids() == set()
    # And the credential still works (looked up again).
    assert host.access.authenticate_token(token).credential_id == info.id


def test_listener_only_takes_callbacks_for_known_channels(host: Host) -> None:
    assert host.listener is not None
    with pytest.raises(ValueError):
        host.listener.on_notify("pix_inserted", lambda payload: None)
    seen: list[str] = []
    host.listener.on_notify(CREDENTIALS_CHANNEL, seen.append)
    info, _ = host.access.create_token(new_ispb())
    wait_for(lambda: str(info.id) in seen, timeout=1, what="the creation's notification")


# ------------------------------------------------------------------ logs


def test_no_secret_in_any_log_record(
    make_host: Callable[..., Host], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    host, other = make_host(), make_host()
    info, token = host.access.create_token(new_ispb(), "logged?")
    host.access.authenticate_token(token)
    other.access.authenticate_token(token)
    host.access.flush_last_used()
    host.access.revoke(info.id)
    wait_for(
        lambda: reason_of(lambda: other.access.authenticate_token(token)) == "revoked",
        timeout=1,
    )
    digest = hashlib.sha256(token.encode()).digest()
    assert caplog.records, "nothing was logged: the check would be vacuous"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args)
        assert token not in text and token[len(TOKEN_PREFIX) :] not in text
        assert digest.hex() not in text
