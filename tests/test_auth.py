"""Access control at the HTTP edge: every route x every kind of credential, in
token and mtls modes, against the real access service on the real database;
revocation seen by a second gunicorn within 1 s; no secret in any log line;
/metrics behind its token; the open-mode warning; 503 bodies without causes.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import logging
import re
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from flask import config as flask_config
from flask.testing import FlaskClient

from _streamkit import insert_messages, new_ispb, wait_for
from conftest import ROOT, Server, free_port, skip_without, with_dbname
from httpclient import HttpClient
from pixstream import config
from pixstream.access import AccessService
from pixstream.api import auth
from pixstream.errors import ConfigError, Unauthorized
from pixstream.runtime import runtime
from problems import assert_problem

PROXY, CLIENT = "10.0.0.1", "10.0.0.99"
ROUTES = ("start", "pull", "delete", "util")
TOKEN_CREDENTIALS = (
    "none", "malformed", "unknown", "revoked", "expired", "other", "right", "admin",
)  # fmt: skip
CERT_CREDENTIALS = (
    "none", "malformed", "unknown", "revoked", "expired", "other", "right", "direct",
)  # fmt: skip


def access(app: Flask) -> AccessService:
    with app.app_context():
        return runtime().access


def expire(db: psycopg.Connection, credential_id: int) -> None:
    """Arrange an expired credential: the expiry moved into the past before first use."""
    db.execute(
        "UPDATE pix_credential SET expires_at = now() - interval '1 minute' WHERE id = %s",
        (credential_id,),
    )


def open_stream(client: FlaskClient, ispb: str, **kwargs: Any) -> str:
    """Start a stream on ``ispb`` (which has messages) and return its Pull-Next."""
    reply = client.get(f"/api/pix/{ispb}/stream/start", **kwargs)
    assert reply.status_code == 200, reply.data
    return str(reply.headers["Pull-Next"])


def open_streams(db: psycopg.Connection, ispb: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM pix_stream WHERE ispb = %s AND closed_at IS NULL", (ispb,)
    ).fetchone()
    return int(row[0]) if row else 0


def messages(db: psycopg.Connection, ispb: str) -> int:
    row = db.execute(
        "SELECT count(*) FROM pix_message WHERE recipient_ispb = %s", (ispb,)
    ).fetchone()
    return int(row[0]) if row else 0


def call(client: FlaskClient, route: str, ispb: str, pull_next: str, **kwargs: Any) -> Any:
    if route == "start":
        return client.get(f"/api/pix/{ispb}/stream/start", **kwargs)
    if route == "pull":
        return client.get(pull_next, **kwargs)
    if route == "delete":
        return client.delete(pull_next, **kwargs)
    return client.post(f"/api/util/msgs/{ispb}/1", **kwargs)


def assert_no_side_effect(db: psycopg.Connection, route: str, ispb: str, before: int) -> None:
    """A refused request did nothing: no stream opened, closed, or message inserted."""
    if route == "util":
        assert messages(db, ispb) == before
    else:
        assert open_streams(db, ispb) == 1  # only the arranged stream


def assert_success(db: psycopg.Connection, route: str, ispb: str, reply: Any) -> None:
    if route == "start":
        assert reply.status_code == 200, reply.data
        assert open_streams(db, ispb) == 2
    elif route == "pull":
        assert reply.status_code == 200, reply.data
    elif route == "delete":
        assert reply.status_code == 200, reply.data
        assert open_streams(db, ispb) == 0
    else:
        assert reply.status_code == 201, reply.data


# -- header parsing -----------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "Token abc", "Bearer a b", 'Bearer a"b',
     "Bearer é", "Bearerabc", "Bearer =abc"],
)  # fmt: skip
def test_malformed_authorization_is_invalid_request(header: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        auth.bearer_token(header)
    assert 'error="invalid_request"' in str(caught.value.www_authenticate)
    # A fixed sentence: the header, which may hold a secret, is never echoed.
    assert str(caught.value) == "the Authorization header is not of the form Bearer <token>"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_authorization_is_a_bare_challenge(header: str | None) -> None:
    with pytest.raises(Unauthorized) as caught:
        auth.bearer_token(header)
    assert caught.value.www_authenticate == 'Bearer realm="pixstream"'


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer pxs_abc-DEF_123", "pxs_abc-DEF_123"), ("bearer a.b~c+d/e==", "a.b~c+d/e=="),
     ("  BEARER   xyz  ", "xyz")],
)  # fmt: skip
def test_bearer_token_is_taken_as_sent(header: str, token: str) -> None:
    assert auth.bearer_token(header) == token


def test_metrics_token_comparison() -> None:
    secret = secrets.token_urlsafe(32)
    assert auth.metrics_token_ok(secret, f"Bearer {secret}")
    assert not auth.metrics_token_ok(secret, f"Bearer {secret}x")
    assert not auth.metrics_token_ok(secret, secret)
    assert not auth.metrics_token_ok(secret, None)


# -- certificates ---------------------------------------------------------------


@dataclass
class Certificate:
    pem: bytes

    @property
    def nginx(self) -> str:
        """As nginx's $ssl_client_escaped_cert sends it."""
        return quote(self.pem.decode(), safe="")

    @property
    def envoy(self) -> str:
        """As Envoy's X-Forwarded-Client-Cert sends it, behind a second proxy's entry."""
        cert = x509.load_pem_x509_certificate(self.pem)
        digest = cert.fingerprint(hashes.SHA256()).hex()
        return (
            f"By=spiffe://cluster.local/ns/pix/sa/pixstream;Hash={digest};"
            f'Cert="{quote(self.pem.decode(), safe="")}";'
            'Subject="CN=bank,O=Bank\\, Inc.";URI=spiffe://bank,'
            "By=spiffe://cluster.local/ns/pix/sa/edge;Hash=00ff;URI="
        )

    @property
    def legacy(self) -> str:
        """As nginx's deprecated $ssl_client_cert arrives: a folded header, unfolded to spaces."""
        return self.pem.decode().strip().replace("\n", " ")


def make_certificate(name: str) -> Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return Certificate(cert.public_bytes(serialization.Encoding.PEM))


def test_certificate_header_formats_give_the_same_pem() -> None:
    cert = make_certificate("bank")
    for value in (cert.nginx, cert.envoy, cert.legacy, cert.pem.decode()):
        pem = auth.forwarded_certificate(value)
        assert x509.load_pem_x509_certificate(pem) == x509.load_pem_x509_certificate(cert.pem)


@pytest.mark.parametrize(
    "value", ["garbage", "By=spiffe://x;Hash=abc", 'Hash=abc;Cert=""', "%2D%2D%2D"]
)
def test_certificate_header_without_a_certificate_is_401(value: str) -> None:
    with pytest.raises(Unauthorized):
        auth.forwarded_certificate(value)


# -- the token-mode matrix ----------------------------------------------------------


@dataclass
class Scene:
    client: FlaskClient
    db: psycopg.Connection
    ispb: str
    pull_next: str
    headers: dict[str, dict[str, str]]
    secrets: list[str]


@pytest.fixture
def token_scene(make_app: Callable[..., Flask], db: psycopg.Connection) -> Scene:
    app = make_app(AUTH="token")
    service = access(app)
    ispb, other = new_ispb(), new_ispb()
    _, right = service.create_token(ispb, "collector")
    _, theirs = service.create_token(other, "another bank")
    _, admin = service.create_token(None, "ops", admin=True)
    info, revoked = service.create_token(ispb, "old")
    service.revoke(info.id)
    info, expired = service.create_token(ispb, "short-lived")
    expire(db, info.id)
    unknown = "pxs_" + secrets.token_urlsafe(32)
    client = app.test_client()
    insert_messages(db, ispb, 5)
    pull_next = open_stream(client, ispb, headers={"Authorization": f"Bearer {right}"})
    return Scene(
        client,
        db,
        ispb,
        pull_next,
        {
            "none": {},
            "malformed": {"Authorization": "Basic dXNlcjpwYXNz"},
            "unknown": {"Authorization": f"Bearer {unknown}"},
            "revoked": {"Authorization": f"Bearer {revoked}"},
            "expired": {"Authorization": f"Bearer {expired}"},
            "other": {"Authorization": f"Bearer {theirs}"},
            "right": {"Authorization": f"Bearer {right}"},
            "admin": {"Authorization": f"Bearer {admin}"},
        },
        [right, theirs, admin, revoked, expired, unknown],
    )


TOKEN_EXPECTED = {
    "none": (401, 'Bearer realm="pixstream"'),
    "malformed": (401, 'error="invalid_request"'),
    "unknown": (401, 'error="invalid_token", error_description="the token is unknown"'),
    "revoked": (401, 'error="invalid_token", error_description="the token was revoked"'),
    "expired": (401, 'error="invalid_token", error_description="the token has expired"'),
    "other": (403, None),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("credential", TOKEN_CREDENTIALS)
def test_token_mode_matrix(token_scene: Scene, route: str, credential: str) -> None:
    scene = token_scene
    before = messages(scene.db, scene.ispb)
    reply = call(
        scene.client, route, scene.ispb, scene.pull_next, headers=scene.headers[credential]
    )
    # Banks read their own ISPB; admins load test data and read no one's payments.
    allowed = credential == ("admin" if route == "util" else "right")
    if allowed:
        assert_success(scene.db, route, scene.ispb, reply)
    else:
        status, challenge = TOKEN_EXPECTED.get(credential, (403, None))
        body = assert_problem(reply, status)
        if status == 401:
            assert reply.headers["WWW-Authenticate"].startswith('Bearer realm="pixstream"')
            assert challenge in reply.headers["WWW-Authenticate"]
        else:
            assert "WWW-Authenticate" not in reply.headers
        assert_no_side_effect(scene.db, route, scene.ispb, before)
        text = str(body) + str(dict(reply.headers))
        assert not any(secret in text for secret in scene.secrets), text
    assert reply.headers["X-Request-ID"]


def test_foreign_credential_learns_nothing_about_ids(token_scene: Scene) -> None:
    """Another ISPB's token gets the same 403 for a live id, a closed one and a made-up one."""
    scene = token_scene
    made_up = re.sub(r"[^/]+$", "a" * 25, scene.pull_next)
    answers = set()
    for path in (scene.pull_next, made_up):
        for method in ("GET", "DELETE"):
            reply = scene.client.open(path, method=method, headers=scene.headers["other"])
            answers.add((reply.status_code, reply.data))
    assert len(answers) == 1, answers
    assert next(iter(answers))[0] == 403
    assert open_streams(scene.db, scene.ispb) == 1


def test_unknown_paths_and_methods_answer_as_before(token_scene: Scene) -> None:
    """Auth guards the routes that exist; a wrong method is still 405, a bad path 404."""
    assert scene_status(token_scene, "DELETE", f"/api/pix/{token_scene.ispb}/stream/start") == 405
    assert scene_status(token_scene, "GET", f"/api/pix/{token_scene.ispb}/nothing") == 404


def test_a_path_that_cannot_be_valid_is_400_for_everyone(token_scene: Scene) -> None:
    for credential in ("none", "other", "right"):
        reply = token_scene.client.get(
            "/api/pix/1234/stream/start", headers=token_scene.headers[credential]
        )
        assert_problem(reply, 400)


def scene_status(scene: Scene, method: str, path: str) -> int:
    return scene.client.open(path, method=method).status_code


# -- the mtls-mode matrix -----------------------------------------------------------


@pytest.fixture
def cert_scene(make_app: Callable[..., Flask], db: psycopg.Connection) -> Scene:
    app = make_app(AUTH="mtls", TRUSTED_PROXIES=f"{PROXY}, 192.168.0.0/16")
    service = access(app)
    ispb, other = new_ispb(), new_ispb()
    right, theirs, revoked, expired, unknown = (make_certificate(n) for n in "abcde")
    service.add_certificate(ispb, right.pem, "bank")
    service.add_certificate(other, theirs.pem, "another bank")
    service.revoke(service.add_certificate(ispb, revoked.pem, "old").id)
    expire(db, service.add_certificate(ispb, expired.pem, "short-lived").id)
    client = app.test_client()
    header = app.config["MTLS_HEADER"]
    insert_messages(db, ispb, 5)
    via_proxy = {"environ_base": {"REMOTE_ADDR": PROXY}}
    pull_next = open_stream(client, ispb, headers={header: right.nginx}, **via_proxy)
    return Scene(
        client,
        db,
        ispb,
        pull_next,
        {
            "none": {},
            "malformed": {header: "not a certificate"},
            "unknown": {header: unknown.nginx},
            "revoked": {header: revoked.nginx},
            "expired": {header: expired.nginx},
            "other": {header: theirs.nginx},
            "right": {header: right.nginx},
            "direct": {header: right.nginx},
        },
        [],
    )


CERT_EXPECTED = {
    "none": 401, "malformed": 401, "unknown": 401, "revoked": 401, "expired": 401,
    "other": 403, "direct": 403,
}  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("credential", CERT_CREDENTIALS)
def test_mtls_mode_matrix(cert_scene: Scene, route: str, credential: str) -> None:
    scene = cert_scene
    before = messages(scene.db, scene.ispb)
    peer = CLIENT if credential == "direct" else PROXY
    reply = call(
        scene.client, route, scene.ispb, scene.pull_next,
        headers=scene.headers[credential], environ_base={"REMOTE_ADDR": peer},
    )  # fmt: skip
    # No certificate is an admin's: the util routes refuse every one of them.
    if credential == "right" and route != "util":
        assert_success(scene.db, route, scene.ispb, reply)
        return
    status = CERT_EXPECTED.get(credential, 403)
    assert_problem(reply, status)
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == 'ClientCertificate realm="pixstream"'
    assert_no_side_effect(scene.db, route, scene.ispb, before)


@pytest.mark.parametrize("form", ["nginx", "envoy", "legacy"])
def test_mtls_accepts_every_proxy_format(
    make_app: Callable[..., Flask], db: psycopg.Connection, form: str
) -> None:
    header = "X-Forwarded-Client-Cert" if form == "envoy" else "X-SSL-Client-Cert"
    app = make_app(AUTH="mtls", TRUSTED_PROXIES=[PROXY], MTLS_HEADER=header)
    cert, ispb = make_certificate("bank"), new_ispb()
    access(app).add_certificate(ispb, cert.pem, "bank")
    insert_messages(db, ispb, 1)
    open_stream(
        app.test_client(),
        ispb,
        headers={header: getattr(cert, form)},
        environ_base={"REMOTE_ADDR": PROXY},
    )


def test_mtls_trusts_networks_and_no_one_else(make_app: Callable[..., Flask]) -> None:
    app = make_app(AUTH="mtls", TRUSTED_PROXIES="192.168.0.0/16,fd00::/8")
    cert, ispb = make_certificate("bank"), new_ispb()
    access(app).add_certificate(ispb, cert.pem, "bank")
    client = app.test_client()
    path = f"/api/pix/{ispb}/stream/{'a' * 25}"
    for peer, status in [("192.168.7.9", 404), ("fd00::1", 404), ("192.169.0.1", 403),
                         ("127.0.0.1", 403), ("fe80::1", 403)]:  # fmt: skip
        reply = client.get(path, headers={"X-SSL-Client-Cert": cert.nginx},
                           environ_base={"REMOTE_ADDR": peer})  # fmt: skip
        assert reply.status_code == status, (peer, reply.data)


# -- live servers: a whole session, revocation across hosts, logs --------------------


@pytest.fixture
def token_app(make_app: Callable[..., Flask]) -> Flask:
    return make_app(AUTH="token")


@pytest.mark.server
def test_live_token_session_and_revocation_on_another_host(
    start_server: Callable[..., Server],
    token_app: Flask,
    db: psycopg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    service = access(token_app)
    ispb = new_ispb()
    info, token = service.create_token(ispb, "collector")
    _, admin = service.create_token(None, "ops", admin=True)
    bearer = {"Authorization": f"Bearer {token}"}
    one = start_server(AUTH="token", LOG_LEVEL="DEBUG", workers=1)
    two = start_server(AUTH="token", LOG_LEVEL="DEBUG", workers=1)

    inserted = one.http.request(
        "POST", f"/api/util/msgs/{ispb}/3", {"Authorization": f"Bearer {admin}"}
    )
    assert inserted.status == 201, inserted.body
    started = one.http.request(
        "GET", f"/api/pix/{ispb}/stream/start", {**bearer, "Accept": "multipart/json"}
    )
    assert started.status == 200 and len(started.json()) == 3, started.body
    # An empty header is no credential (and keeps the suite's token-mode client from adding one).
    no_token = {"Authorization": ""}
    assert one.http.request("GET", f"/api/pix/{ispb}/stream/start", no_token).status == 401
    assert two.http.request("DELETE", str(started.pull_next), bearer).status == 200

    # The token is cached on the second host: revocation must still reach it within 1 s.
    probe = f"/api/pix/{ispb}/stream/{'a' * 25}"
    assert two.http.request("DELETE", probe, bearer).status == 404
    assert service.revoke(info.id)
    wait_for(
        lambda: two.http.request("DELETE", probe, bearer).status == 401,
        timeout=1.0,
        interval=0.01,
        what="the revoked token refused on the second host",
    )
    for server in (one, two):
        for _ in range(3):
            reply = HttpClient(server.base).request("DELETE", probe, bearer, fresh=True)
            assert reply.status == 401
            assert 'error_description="the token was revoked"' in str(
                reply.header("WWW-Authenticate")
            )

    for server in (one, two):
        server.http.close()
        output = server.output()
        assert f"/api/pix/{ispb}/stream/" in output  # the access log was captured
        assert token not in output and admin not in output
    assert token not in caplog.text and admin not in caplog.text


# -- /metrics, /readyz, the open-mode warning, util routes off by default -------------


def test_metrics_token(make_app: Callable[..., Flask]) -> None:
    secret = secrets.token_urlsafe(32)
    client = make_app(METRICS_TOKEN=secret, AUTH="none").test_client()
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": secret}):  # fmt: skip
        reply = client.get("/metrics", headers=headers)
        body = assert_problem(reply, 401)
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="pixstream-metrics"'
        assert secret not in str(body)
    reply = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
    assert reply.status_code == 200
    assert b'pixstream_auth_mode{mode="none"} 1.0' in reply.data


@pytest.mark.server
def test_metrics_on_a_separate_bind(start_server: Callable[..., Server]) -> None:
    """PIXSTREAM_METRICS_BIND: the master serves the workers' metrics there, the public port 404."""
    secret = secrets.token_urlsafe(32)
    port = free_port()
    server = start_server(workers=2, METRICS_BIND=f"127.0.0.1:{port}", METRICS_TOKEN=secret)
    assert_problem(server.http.request("GET", "/metrics"), 404)
    ispb = new_ispb()
    start = server.http.request("GET", f"/api/pix/{ispb}/stream/start")
    assert start.status in (200, 204)
    internal = HttpClient(f"http://127.0.0.1:{port}")
    try:
        refused = internal.request("GET", "/metrics")
        assert_problem(refused, 401)
        assert refused.header("WWW-Authenticate") == 'Bearer realm="pixstream-metrics"'
        reply = internal.request("GET", "/metrics", {"Authorization": f"Bearer {secret}"})
        assert reply.status == 200
        assert (reply.header("Content-Type") or "").startswith("text/plain; version=0.0.4")
        text = reply.body.decode()
        # Summed over the workers' files: the start above is counted.
        assert re.search(r"^pixstream_streams_opened_total [1-9]", text, re.MULTILINE), text
        assert "pixstream_auth_mode{mode=" in text
        assert_problem(internal.request("GET", "/other"), 404)
    finally:
        internal.close()


def test_metrics_bind_must_be_an_address(make_app: Callable[..., Flask]) -> None:
    for bad in ("9100", "localhost:9100", "127.0.0.1:0", "127.0.0.1:x", "[::1]:99999"):
        with pytest.raises(ConfigError, match="PIXSTREAM_METRICS_BIND"):
            make_app(METRICS_BIND=bad)


def test_metrics_open_without_a_token_and_say_the_mode(make_app: Callable[..., Flask]) -> None:
    reply = make_app(AUTH="token").test_client().get("/metrics")
    assert reply.status_code == 200
    assert b'pixstream_auth_mode{mode="token"} 1.0' in reply.data


@pytest.mark.parametrize("mode", ["none", "token"])
def test_readyz_says_the_mode(make_app: Callable[..., Flask], mode: str) -> None:
    client = make_app(AUTH=mode).test_client()
    reply = wait_for(
        lambda: (r := client.get("/readyz")).status_code == 200 and r, timeout=10, what="ready"
    )
    assert reply.get_json()["auth"] == mode


def test_open_mode_warns_once_per_process(
    make_app: Callable[..., Flask],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(auth, "_open_warning_logged", False)
    caplog.set_level(logging.WARNING, logger="pixstream")
    make_app(AUTH="token")
    make_app(AUTH="none")
    make_app(AUTH="none")
    warnings = [r for r in caplog.records if "PIXSTREAM_AUTH=none" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_util_routes_are_off_by_default() -> None:
    assert config.DEFAULTS["UTIL_ROUTES"] is False
    assert config.DEFAULTS["AUTH"] == "none"


# -- 503 bodies say what failed, never the driver's text ------------------------------


def test_database_unavailable_body_names_no_host_or_user(
    make_app: Callable[..., Flask], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"pixstream_missing_{secrets.token_hex(4)}"
    # No credential can be made in a missing database: open mode.
    app = make_app(
        DATABASE_URL=with_dbname(database_url, name), POOL_TIMEOUT_SECONDS=0.5, AUTH="none"
    )
    client = app.test_client()
    reply = client.get(f"/api/pix/{new_ispb()}/stream/start", headers={"X-Request-ID": "rid-503"})
    body = assert_problem(reply, 503, retry_after=True)
    assert body["detail"] == "database unavailable; retry after Retry-After"
    ready = assert_problem(client.get("/readyz"), 503, retry_after=True)
    assert "database unavailable" in ready["detail"]
    for document in (body, ready):
        assert name not in str(document) and "postgres" not in str(document).lower()
    # The cause is logged, with the request id, for the operator.
    (record,) = [r for r in caplog.records if getattr(r, "request_id", "") == "rid-503"]
    assert record.levelno == logging.WARNING


# -- settings -------------------------------------------------------------------------


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> flask_config.Config:
    for key, value in env.items():
        monkeypatch.setenv(f"PIXSTREAM_{key}", value)
    settings = flask_config.Config(".")
    config.load(settings, {"DATABASE_URL": "postgresql://x@127.0.0.1:1/none"})
    return settings


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    import os

    for name in list(os.environ):
        if name.startswith("PIXSTREAM_"):
            monkeypatch.delenv(name)
    yield monkeypatch


def test_access_settings_from_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(
        clean_env,
        AUTH="mtls",
        TRUSTED_PROXIES="10.0.0.1, 192.168.0.0/16,fd00::/8",
        MTLS_HEADER="X-Forwarded-Client-Cert",
        METRICS_TOKEN="0123456789012345678",
        CREDENTIAL_CACHE_SECONDS="5",
    )
    assert settings["AUTH"] == "mtls"
    assert settings["TRUSTED_PROXIES"] == ["10.0.0.1/32", "192.168.0.0/16", "fd00::/8"]
    assert settings["MTLS_HEADER"] == "X-Forwarded-Client-Cert"
    assert settings["METRICS_TOKEN"] == "0123456789012345678"  # a string, zeros kept
    assert settings["CREDENTIAL_CACHE_SECONDS"] == 5
    as_json = load(clean_env, TRUSTED_PROXIES='["10.1.2.3", "10.2.0.0/16"]')
    assert as_json["TRUSTED_PROXIES"] == ["10.1.2.3/32", "10.2.0.0/16"]


def test_access_defaults(clean_env: pytest.MonkeyPatch) -> None:
    settings = load(clean_env)
    assert settings["AUTH"] == "none"
    assert settings["TRUSTED_PROXIES"] == []
    assert settings["MTLS_HEADER"] == "X-SSL-Client-Cert"
    assert settings["METRICS_TOKEN"] is None
    assert settings["CREDENTIAL_CACHE_SECONDS"] == 30
    assert settings["UTIL_ROUTES"] is False


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AUTH": "basic"}, "PIXSTREAM_AUTH"),
        ({"AUTH": "mtls"}, "PIXSTREAM_TRUSTED_PROXIES"),
        ({"AUTH": "mtls", "TRUSTED_PROXIES": "proxy.local"}, "PIXSTREAM_TRUSTED_PROXIES"),
        ({"TRUSTED_PROXIES": "10.0.0.0/33"}, "PIXSTREAM_TRUSTED_PROXIES"),
        ({"MTLS_HEADER": "X SSL"}, "PIXSTREAM_MTLS_HEADER"),
        ({"METRICS_TOKEN": "short"}, "PIXSTREAM_METRICS_TOKEN"),
        ({"METRICS_TOKEN": "short but with spaces"}, "PIXSTREAM_METRICS_TOKEN"),
        ({"CREDENTIAL_CACHE_SECONDS": "-1"}, "PIXSTREAM_CREDENTIAL_CACHE_SECONDS"),
    ],
)
def test_invalid_access_settings_stop_start_up(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(clean_env, **env)
    assert variable in str(caught.value)
    assert "short" not in str(caught.value)  # a secret is never echoed


# -- the shipped nginx example, end to end ---------------------------------------------

NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "pixstream.conf"


@dataclass
class Pki:
    """A client CA with two banks' certificates, a stranger's, and the proxy's server cert."""

    directory: Path
    bank: tuple[Path, Path]
    other: tuple[Path, Path]
    stranger: tuple[Path, Path]
    bank_pem: bytes
    other_pem: bytes


def _issue(
    directory: Path,
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key, cert_path, key_path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_cert, ca_key, ca_path, _ = _issue(tmp_path, "client-ca", None, ca=True)
    ca_path.rename(tmp_path / "client-ca.pem")
    _issue(tmp_path, "pix.example.com", None, server=True)  # the proxy's own certificate
    issuer = (ca_cert.subject, ca_key)
    _, _, bank_crt, bank_key = _issue(tmp_path, "bank", issuer)
    _, _, other_crt, other_key = _issue(tmp_path, "other", issuer)
    _, _, stranger_crt, stranger_key = _issue(tmp_path, "stranger", None)  # not the CA's
    return Pki(
        tmp_path,
        (bank_crt, bank_key),
        (other_crt, other_key),
        (stranger_crt, stranger_key),
        bank_crt.read_bytes(),
        other_crt.read_bytes(),
    )


class Nginx:
    """The shipped example, pointed at a test server and the test's PKI, run in the foreground."""

    def __init__(self, pki: Pki, upstream_port: int) -> None:
        self.port = free_port()
        site = NGINX_EXAMPLE.read_text()
        site = site.replace("/etc/nginx/tls/", f"{pki.directory}/")
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;")
        upstreams = re.findall(r"server 10\.0\.1\.\d+:8000;", site)
        assert upstreams, "the example's upstream block changed"
        site = site.replace(upstreams[0], f"server 127.0.0.1:{upstream_port};")
        for line in upstreams[1:]:
            site = site.replace(line, "")
        d = pki.directory
        (d / "site.conf").write_text(site)
        (d / "nginx.conf").write_text(
            f"daemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n"
            "events { worker_connections 64; }\n"
            f"http {{\n access_log {d}/access.log;\n client_body_temp_path {d}/body;\n"
            f" proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fastcgi;\n"
            f" uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n"
            f" include {d}/site.conf;\n}}\n"
        )
        self.directory = d
        self.process = subprocess.Popen(
            ["nginx", "-p", str(d), "-c", str(d / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._listening, timeout=10, interval=0.05, what="nginx listening")

    def _listening(self) -> bool:
        assert self.process.poll() is None, (self.directory / "error.log").read_text()
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def request(
        self,
        path: str,
        method: str = "GET",
        *,
        cert: tuple[Path, Path] | None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        context = ssl.create_default_context(cafile=str(self.directory / "pix.example.com.crt"))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=15)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.mark.server
def test_shipped_nginx_example_binds_requests_to_certificates(
    start_server: Callable[..., Server],
    make_app: Callable[..., Flask],
    db: psycopg.Connection,
    pki: Pki,
) -> None:
    skip_without("nginx", shutil.which("nginx"))
    service = access(make_app(AUTH="mtls", TRUSTED_PROXIES="127.0.0.1"))
    ispb, other = new_ispb(), new_ispb()
    service.add_certificate(ispb, pki.bank_pem, "bank")
    service.add_certificate(other, pki.other_pem, "other bank")
    insert_messages(db, ispb, 2)
    server = start_server(AUTH="mtls", TRUSTED_PROXIES="127.0.0.1", workers=1)
    nginx = Nginx(pki, server.port)
    try:
        start = f"/api/pix/{ispb}/stream/start"
        status, body = nginx.request(start, cert=pki.bank, headers={"Accept": "multipart/json"})
        assert status == 200 and len(json.loads(body)) == 2, body

        # Another bank's certificate, even with a forged copy of the bank's in the header.
        forged = {"X-SSL-Client-Cert": quote(pki.bank_pem.decode(), safe="")}
        for headers in (None, forged):
            status, body = nginx.request(start, cert=pki.other, headers=headers)
            assert status == 403, body
        # No certificate, or one the CA did not issue: nginx refuses before pixstream.
        for cert in (None, pki.stranger):
            status, _ = nginx.request(start, cert=cert, headers=forged)
            assert status == 400
        assert open_streams(db, ispb) == 1
        status, _ = nginx.request("/metrics", cert=pki.bank)
        assert status == 404
        assert nginx.request("/readyz", cert=pki.bank)[0] == 200
    finally:
        nginx.stop()


def test_refusals_conform_to_the_openapi_document(token_scene: Scene) -> None:
    from test_openapi import STREAM, UTIL, check

    scene = token_scene
    for credential, status in (("none", 401), ("revoked", 401), ("other", 403)):
        for method, path, documented in (
            ("GET", scene.pull_next, STREAM),
            ("DELETE", scene.pull_next, STREAM),
            ("POST", f"/api/util/msgs/{scene.ispb}/1", UTIL),
        ):
            reply = scene.client.open(path, method=method, headers=scene.headers[credential])
            assert reply.status_code == status
            assert check(reply, documented, method.lower())["status"] == status
    reply = scene.client.get(
        f"/api/pix/{scene.ispb}/stream/start", headers=scene.headers["expired"]
    )
    check(reply, "/api/pix/{ispb}/stream/start", "get")
