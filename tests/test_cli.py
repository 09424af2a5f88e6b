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

from pixstream.sql import migrations

RATE = re.compile(r"inserted (\d+) messages for (\d{8}) in [0-9.]+ s \(([0-9,]+) messages/s\)")


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
