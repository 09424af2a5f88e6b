"""``flask seed-pix`` and ``flask db-upgrade``, in process and as a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from flask import Flask
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pixstream.db
from pixstream import create_app
from pixstream.runtime import runtime
from pixstream.sql import migrations

RATE = re.compile(r"inserted (\d+) messages for (\d{8}) in [0-9.]+ s \(([0-9,]+) messages/s\)")


def url_location(url: str) -> str:
    """What seed-pix must say for DATABASE_URL ``url``: host, port and database only."""
    params = conninfo_to_dict(url)
    port = f":{params['port']}" if params.get("port") else ""
    return f"into DATABASE_URL {params.get('host') or 'localhost'}{port}/{params['dbname']}"


def count(db: psycopg.Connection, ispb: str) -> int:
    (n,) = db.execute(
        "SELECT count(*) FROM pix_message WHERE recipient_ispb = %s", (ispb,)
    ).fetchone()  # type: ignore[misc]
    return int(n)


@pytest.mark.parametrize(("total", "batch"), [(250, 100), (7, 10_000), (200, 1)])
def test_seed_pix_inserts_and_prints_rate(
    app: Flask, db: psycopg.Connection, total: int, batch: int
) -> None:
    result = app.test_cli_runner().invoke(
        args=["seed-pix", "32074986", str(total), "--batch", str(batch)]
    )
    assert result.exit_code == 0, result.output
    match = RATE.search(result.output)
    assert match, result.output
    assert match.group(1) == str(total)
    assert match.group(2) == "32074986"
    assert int(match.group(3).replace(",", "")) > 0
    assert url_location(app.config["DATABASE_URL"]) in result.output.splitlines()
    assert count(db, "32074986") == total
    (distinct,) = db.execute("SELECT count(DISTINCT end_to_end_id) FROM pix_message").fetchone()  # type: ignore[misc]
    assert distinct == total


def test_seed_pix_default_batch(app: Flask, db: psycopg.Connection) -> None:
    result = app.test_cli_runner().invoke(args=["seed-pix", "60701190", "30"])
    assert result.exit_code == 0, result.output
    assert count(db, "60701190") == 30


@pytest.mark.parametrize("ispb", ["3207498", "abcdefgh", "320749861", "3207498x"])
def test_seed_pix_bad_ispb(app: Flask, db: psycopg.Connection, ispb: str) -> None:
    result = app.test_cli_runner().invoke(args=["seed-pix", ispb, "10"])
    assert result.exit_code != 0
    assert "ISPB" in result.output
    assert "8 digits" in result.output
    (n,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    assert n == 0


@pytest.mark.parametrize(
    "args", [["32074986", "0"], ["32074986", "-5"], ["32074986", "many"], ["32074986"]]
)
def test_seed_pix_bad_count(app: Flask, db: psycopg.Connection, args: list[str]) -> None:
    result = app.test_cli_runner().invoke(args=["seed-pix", *args])
    assert result.exit_code != 0
    assert "COUNT" in result.output
    (n,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    assert n == 0


@pytest.mark.parametrize("batch", ["0", "-1", "x"])
def test_seed_pix_bad_batch(app: Flask, db: psycopg.Connection, batch: str) -> None:
    result = app.test_cli_runner().invoke(args=["seed-pix", "32074986", "10", "--batch", batch])
    assert result.exit_code != 0
    assert "--batch" in result.output
    (n,) = db.execute("SELECT count(*) FROM pix_message").fetchone()  # type: ignore[misc]
    assert n == 0


def test_db_upgrade_when_current(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["db-upgrade"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "schema up to date"


@pytest.fixture
def scratch_url(scratch_database: str) -> str:
    return scratch_database


def test_db_upgrade_applies_pending(make_app: Callable[..., Flask], scratch_url: str) -> None:
    app = make_app(DATABASE_URL=scratch_url)  # migrates at creation
    with psycopg.connect(scratch_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    runner = app.test_cli_runner()
    result = runner.invoke(args=["db-upgrade"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "applied: " + ", ".join(m.name for m in migrations())
    with psycopg.connect(scratch_url) as conn:
        assert conn.execute("SELECT to_regclass('pix_message')").fetchone() == ("pix_message",)
    result = runner.invoke(args=["db-upgrade"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "schema up to date"


def test_real_flask_command_in_subprocess(
    database_url: str, db: psycopg.Connection, tmp_path: Path
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIXSTREAM_", "FLASK_")) and k != "DATABASE_URL"
    }
    env["DATABASE_URL"] = database_url
    flask = Path(sys.executable).with_name("flask")
    command = [str(flask), "--app", "pixstream", "seed-pix", "32074986", "50"]
    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    match = RATE.search(completed.stdout)
    assert match, completed.stdout + completed.stderr
    assert match.group(1) == "50"
    assert url_location(database_url) in completed.stdout.splitlines()
    assert count(db, "32074986") == 50
    # Nothing was created in the working directory: no embedded database there.
    assert list(tmp_path.iterdir()) == []


def test_real_flask_command_bad_ispb(database_url: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIXSTREAM_", "FLASK_"))}
    env["DATABASE_URL"] = database_url
    flask = Path(sys.executable).with_name("flask")
    completed = subprocess.run(
        [str(flask), "--app", "pixstream", "seed-pix", "1234", "50"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode != 0
    assert "ISPB" in completed.stderr and "8 digits" in completed.stderr


def test_seed_pix_never_prints_the_password(
    make_app: Callable[..., Flask], database_url: str, db: psycopg.Connection
) -> None:
    """It says where the data went by host, port and database; never the password."""
    params = conninfo_to_dict(database_url)
    params["password"] = "s3cret"  # the test servers trust local connections: ignored
    app = make_app(DATABASE_URL=make_conninfo(**params))
    result = app.test_cli_runner().invoke(args=["seed-pix", "32074986", "3"])
    assert result.exit_code == 0, result.output
    assert url_location(database_url) in result.output.splitlines()
    assert "s3cret" not in result.output
    url = "postgresql://collector:s3cret@db.example:6543/pix?sslmode=require"
    assert pixstream.db.server_and_database(url) == "db.example:6543/pix"


def test_seed_pix_from_any_directory_uses_the_servers_embedded_database(
    database_url: str, db: psycopg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without DATABASE_URL, seed-pix run from two directories finds one data directory.

    The embedded server itself is stood in for by the test database: what is
    checked is which data directory it is started in, and what seed-pix says.
    """
    started: list[Path] = []

    def embedded_url(data_dir: str) -> str:
        started.append(pixstream.db.data_path(data_dir))
        return database_url

    monkeypatch.setattr(pixstream.db, "embedded_url", embedded_url)
    for name in list(os.environ):
        if name.startswith("PIXSTREAM_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    data_home = (tmp_path / "xdg").resolve()
    monkeypatch.setenv("XDG_DATA_HOME", str(data_home))
    for name in ("here", "elsewhere"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        app = create_app()
        try:
            result = app.test_cli_runner().invoke(args=["seed-pix", "32074986", "5"])
        finally:
            with app.app_context():
                runtime().stop()
        assert result.exit_code == 0, result.output
        assert f"into embedded PostgreSQL in {data_home / 'pixstream'}" in result.output
        assert list((tmp_path / name).iterdir()) == []
    assert started == [data_home / "pixstream"] * 2
    assert count(db, "32074986") == 10
