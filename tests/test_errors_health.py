"""Problem documents for Flask's own errors, liveness, and readiness (up and down)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from werkzeug.test import TestResponse

from problems import assert_problem

ISPB = "32074986"
SOME_ID = "abcdefghijkl0123"


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


def allowed(reply: TestResponse) -> set[str]:
    return {method.strip() for method in reply.headers["Allow"].split(",")}


def wait_ready(client: FlaskClient, timeout: float = 20) -> TestResponse:
    """Poll /readyz until 200: the listener connects in the background."""
    deadline = time.monotonic() + timeout
    while True:
        reply = client.get("/readyz")
        if reply.status_code == 200 or time.monotonic() > deadline:
            return reply


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/api",
        "/api/pix",
        f"/api/pix/{ISPB}",
        f"/api/pix/{ISPB}/stream",
        f"/api/pix/{ISPB}/stream/",
        f"/api/pix/{ISPB}/stream/start/extra",
        "/api/util/msgs",
        f"/api/util/msgs/{ISPB}",
    ],
)
def test_unknown_path_is_problem_404(client: FlaskClient, path: str) -> None:
    assert_problem(client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/healthz"),
        ("DELETE", "/readyz"),
        ("POST", f"/api/pix/{ISPB}/stream/start"),
        ("PUT", f"/api/pix/{ISPB}/stream/start"),
        ("DELETE", f"/api/pix/{ISPB}/stream/start"),
        ("POST", f"/api/pix/{ISPB}/stream/{SOME_ID}"),
        ("PATCH", f"/api/pix/{ISPB}/stream/{SOME_ID}"),
        ("HEAD", f"/api/pix/{ISPB}/stream/start"),
        ("HEAD", f"/api/pix/{ISPB}/stream/{SOME_ID}"),
    ],
)
def test_wrong_method_is_problem_405_with_allow(
    client: FlaskClient, db: psycopg.Connection, method: str, path: str
) -> None:
    reply = client.open(path, method=method)
    assert reply.status_code == 405
    assert "GET" in allowed(reply)
    assert method not in allowed(reply)
    if method != "HEAD":  # a HEAD answer has no body
        assert_problem(reply, 405)
    # Refusing the method opened no stream.
    (streams,) = db.execute("SELECT count(*) FROM pix_stream").fetchone()  # type: ignore[misc]
    assert streams == 0


def test_allow_on_start_lists_only_working_methods(client: FlaskClient) -> None:
    reply = client.post(f"/api/pix/{ISPB}/stream/start")
    assert reply.status_code == 405
    # GET works (and would long-poll); every other listed method must work too.
    for method in sorted(allowed(reply) - {"OPTIONS", "GET"}):
        answer = client.open(f"/api/pix/{ISPB}/stream/start", method=method)
        assert answer.status_code != 405, f"Allow lists {method}, which answers 405"


def test_healthz(client: FlaskClient) -> None:
    reply = client.get("/healthz")
    assert reply.status_code == 200
    assert reply.get_json() == {"status": "ok"}


def test_unexpected_error_is_problem_500(make_app: Callable[..., Flask]) -> None:
    app = make_app()

    def boom() -> str:
        raise RuntimeError("secret internals")

    app.add_url_rule("/boom", view_func=boom)
    body = assert_problem(app.test_client().get("/boom"), 500)
    assert "secret internals" not in str(body)


def test_readyz_when_database_and_listener_are_up(app: Flask) -> None:
    reply = wait_ready(app.test_client())
    assert reply.status_code == 200, reply.data
    assert reply.get_json() == {
        "status": "ready",
        "database": "ok",
        "listener": "ok",
        "auth": app.config["AUTH"],
    }


@pytest.fixture
def doomed_database(database_url: str) -> Iterator[tuple[str, Callable[[], None]]]:
    """A migrated database of this test's own, and a function that drops it."""
    name = f"pixstream_doomed_{secrets.token_hex(4)}"
    admin = with_dbname(database_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        yield with_dbname(database_url, name), drop
    finally:
        drop()


def test_database_unreachable_is_503_with_retry_after(
    make_app: Callable[..., Flask], doomed_database: tuple[str, Callable[[], None]]
) -> None:
    url, drop = doomed_database
    # Open mode: what is tested is the database going away, not credentials.
    app = make_app(DATABASE_URL=url, POOL_TIMEOUT_SECONDS=0.5, AUTH="none")  # runs the migrations
    client = app.test_client()
    assert wait_ready(client).status_code == 200
    assert client.post(f"/api/util/msgs/{ISPB}/2").status_code == 201

    drop()

    long_poll = app.config["LONG_POLL_SECONDS"]
    for path in ("/readyz", "/readyz", f"/api/pix/{ISPB}/stream/start"):
        started = time.monotonic()
        reply = client.get(path)
        elapsed = time.monotonic() - started
        assert_problem(reply, 503)
        assert int(reply.headers["Retry-After"]) >= 1
        assert elapsed < long_poll + 2, f"{path} took {elapsed:.1f} s with the database gone"
    # Liveness does not depend on the database.
    assert client.get("/healthz").status_code == 200
    reply = client.post(f"/api/util/msgs/{ISPB}/2")
    assert_problem(reply, 503)
    assert "Retry-After" in reply.headers


def test_database_missing_from_the_start_is_503(
    make_app: Callable[..., Flask], database_url: str
) -> None:
    """A worker that boots while its database is unreachable answers 503, not 500."""
    missing = with_dbname(database_url, f"pixstream_missing_{secrets.token_hex(4)}")
    app = make_app(DATABASE_URL=missing, POOL_TIMEOUT_SECONDS=0.5, AUTH="none")
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    for path in ("/readyz", f"/api/pix/{ISPB}/stream/start"):
        started = time.monotonic()
        reply = client.get(path)
        assert_problem(reply, 503)
        assert int(reply.headers["Retry-After"]) >= 1
        assert time.monotonic() - started < app.config["LONG_POLL_SECONDS"] + 2
