"""Settings: defaults, PIXSTREAM_* environment variables, and start-up validation.

Invalid values must stop ``create_app`` with a ConfigError that names the
environment variable to fix, before anything touches the database.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from pixstream import create_app
from pixstream.config import default_data_dir
from pixstream.errors import ConfigError
from pixstream.runtime import runtime

# Never connected to: validation fails first. Should a bad value slip through,
# create_app boots anyway (it tolerates a database that is down) and the
# pytest.raises(ConfigError) around it fails: "DID NOT RAISE".
UNREACHABLE_URL = "postgresql://postgres@127.0.0.1:1/none?connect_timeout=2"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PIXSTREAM_* or DATABASE_URL from the outer environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PIXSTREAM_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)


@pytest.fixture
def env_app(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Flask]]:
    """Build an app from the environment alone: DATABASE_URL plus the given PIXSTREAM_*."""
    apps: list[Flask] = []

    def build(**env: str) -> Flask:
        monkeypatch.setenv("DATABASE_URL", database_url)
        for key, value in env.items():
            monkeypatch.setenv(f"PIXSTREAM_{key}", value)
        app = create_app()
        apps.append(app)
        return app

    yield build
    for app in apps:
        with app.app_context():
            runtime().stop()


def test_defaults(
    env_app: Callable[..., Flask], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    config = env_app().config
    assert config["DATABASE_URL"] == database_url
    assert config["DATA_DIR"] == str(Path.home() / ".local" / "share" / "pixstream")
    assert config["LONG_POLL_SECONDS"] == 8
    assert config["STREAM_IDLE_SECONDS"] == 60
    assert config["MAX_STREAMS_PER_ISPB"] == 6
    assert config["MAX_BATCH"] == 10
    assert config["UTIL_ROUTES"] is False  # test data only when asked for
    assert config["UTIL_MAX_MESSAGES"] == 100_000
    assert config["POOL_SIZE"] == 10
    assert config["POOL_TIMEOUT_SECONDS"] == 3
    assert config["SWEEP_SECONDS"] == 10
    assert config["SHED_WAIT_SECONDS"] == 5  # what an 8 s window leaves after a 3 s transaction


def test_environment_variables_are_read(env_app: Callable[..., Flask]) -> None:
    config = env_app(
        DATA_DIR="/var/lib/pixstream",
        LONG_POLL_SECONDS="2.5",
        STREAM_IDLE_SECONDS="30",
        MAX_STREAMS_PER_ISPB="3",
        MAX_BATCH="4",
        UTIL_ROUTES="false",
        UTIL_MAX_MESSAGES="500",
        POOL_SIZE="5",
        POOL_TIMEOUT_SECONDS="1.5",
        SWEEP_SECONDS="7",
    ).config
    assert config["DATA_DIR"] == "/var/lib/pixstream"
    assert config["LONG_POLL_SECONDS"] == 2.5
    assert config["STREAM_IDLE_SECONDS"] == 30
    assert config["MAX_STREAMS_PER_ISPB"] == 3
    assert config["MAX_BATCH"] == 4
    assert config["UTIL_ROUTES"] is False
    assert config["UTIL_MAX_MESSAGES"] == 500
    assert config["POOL_SIZE"] == 5
    assert config["POOL_TIMEOUT_SECONDS"] == 1.5
    assert config["SWEEP_SECONDS"] == 7


def test_environment_settings_take_effect(env_app: Callable[..., Flask]) -> None:
    """Not just stored: the routes follow what the environment says."""
    on = env_app(UTIL_ROUTES="true", UTIL_MAX_MESSAGES="3").test_client()
    assert on.post("/api/util/msgs/32074986/3").status_code == 201
    assert on.post("/api/util/msgs/32074986/4").status_code == 400
    off = env_app(UTIL_ROUTES="false").test_client()
    assert off.post("/api/util/msgs/32074986/1").status_code == 404


def test_test_config_overrides_environment(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIXSTREAM_MAX_BATCH", "7")
    app = create_app({"DATABASE_URL": database_url, "MAX_BATCH": 3})
    try:
        assert app.config["MAX_BATCH"] == 3
    finally:
        with app.app_context():
            runtime().stop()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"LONG_POLL_SECONDS": "abc"}, "PIXSTREAM_LONG_POLL_SECONDS"),
        ({"LONG_POLL_SECONDS": "0"}, "PIXSTREAM_LONG_POLL_SECONDS"),
        ({"LONG_POLL_SECONDS": "-1"}, "PIXSTREAM_LONG_POLL_SECONDS"),
        ({"LONG_POLL_SECONDS": "true"}, "PIXSTREAM_LONG_POLL_SECONDS"),
        ({"STREAM_IDLE_SECONDS": "soon"}, "PIXSTREAM_STREAM_IDLE_SECONDS"),
        ({"STREAM_IDLE_SECONDS": "8"}, "PIXSTREAM_STREAM_IDLE_SECONDS"),
        ({"STREAM_IDLE_SECONDS": "5"}, "PIXSTREAM_STREAM_IDLE_SECONDS"),
        (
            {"LONG_POLL_SECONDS": "30", "STREAM_IDLE_SECONDS": "20"},
            "PIXSTREAM_STREAM_IDLE_SECONDS",
        ),
        ({"MAX_STREAMS_PER_ISPB": "0"}, "PIXSTREAM_MAX_STREAMS_PER_ISPB"),
        ({"MAX_STREAMS_PER_ISPB": "2.5"}, "PIXSTREAM_MAX_STREAMS_PER_ISPB"),
        ({"MAX_BATCH": "-5"}, "PIXSTREAM_MAX_BATCH"),
        ({"MAX_BATCH": "0"}, "PIXSTREAM_MAX_BATCH"),
        ({"MAX_BATCH": "ten"}, "PIXSTREAM_MAX_BATCH"),
        ({"MAX_BATCH": "true"}, "PIXSTREAM_MAX_BATCH"),
        ({"UTIL_ROUTES": "yes"}, "PIXSTREAM_UTIL_ROUTES"),
        ({"UTIL_ROUTES": "1"}, "PIXSTREAM_UTIL_ROUTES"),
        ({"UTIL_MAX_MESSAGES": "0"}, "PIXSTREAM_UTIL_MAX_MESSAGES"),
        ({"UTIL_MAX_MESSAGES": "1e3"}, "PIXSTREAM_UTIL_MAX_MESSAGES"),
        ({"POOL_SIZE": "0"}, "PIXSTREAM_POOL_SIZE"),
        ({"POOL_TIMEOUT_SECONDS": "0"}, "PIXSTREAM_POOL_TIMEOUT_SECONDS"),
        ({"POOL_TIMEOUT_SECONDS": "60"}, "PIXSTREAM_POOL_TIMEOUT_SECONDS"),
        ({"SWEEP_SECONDS": "-1"}, "PIXSTREAM_SWEEP_SECONDS"),
        ({"SWEEP_SECONDS": "often"}, "PIXSTREAM_SWEEP_SECONDS"),
        ({"IDLE_CLAIM_EVERY": "0"}, "PIXSTREAM_IDLE_CLAIM_EVERY"),
        ({"IDLE_CLAIM_EVERY": "2.5"}, "PIXSTREAM_IDLE_CLAIM_EVERY"),
        ({"RETENTION_HOURS": "0"}, "PIXSTREAM_RETENTION_HOURS"),
        ({"RETENTION_HOURS": "a week"}, "PIXSTREAM_RETENTION_HOURS"),
        ({"DATA_DIR": ""}, "PIXSTREAM_DATA_DIR"),
    ],
)
def test_invalid_environment_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], variable: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_URL)
    for key, value in env.items():
        monkeypatch.setenv(f"PIXSTREAM_{key}", value)
    with pytest.raises(ConfigError) as caught:
        create_app()
    assert variable in str(caught.value)


@pytest.mark.parametrize("value", ["not a url", "localhost", 5432])
def test_invalid_database_url_stops_start_up(value: object) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        create_app({"DATABASE_URL": value})


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"LONG_POLL_SECONDS": "8"}, "PIXSTREAM_LONG_POLL_SECONDS"),
        ({"MAX_BATCH": 2.0}, "PIXSTREAM_MAX_BATCH"),
        ({"UTIL_ROUTES": "false"}, "PIXSTREAM_UTIL_ROUTES"),
        ({"STREAM_IDLE_SECONDS": 8, "LONG_POLL_SECONDS": 8}, "PIXSTREAM_STREAM_IDLE_SECONDS"),
    ],
)
def test_invalid_test_config_stops_start_up(overrides: dict[str, object], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_app({"DATABASE_URL": UNREACHABLE_URL, **overrides})
    assert variable in str(caught.value)


@pytest.mark.parametrize(
    ("window", "pool_timeout", "expected"),
    [(8, 3, 5), (3, 2, 1), (0.5, 2, 0.5), (20, 3, 17)],
)
def test_a_starts_shed_wait_defaults_to_what_its_window_leaves(
    env_app: Callable[..., Flask], window: float, pool_timeout: float, expected: float
) -> None:
    config = env_app(LONG_POLL_SECONDS=str(window), POOL_TIMEOUT_SECONDS=str(pool_timeout)).config
    assert config["SHED_WAIT_SECONDS"] == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LONG_POLL_SECONDS", "NaN"),
        ("STREAM_IDLE_SECONDS", "NaN"),
        ("STREAM_IDLE_SECONDS", "Infinity"),
        ("SWEEP_SECONDS", "Infinity"),
    ],
)
def test_non_finite_numbers_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_URL)
    monkeypatch.setenv(f"PIXSTREAM_{variable}", value)
    with pytest.raises(ConfigError, match=f"PIXSTREAM_{variable}"):
        create_app()


def test_data_dir_that_looks_like_json_stays_a_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIXSTREAM_DATA_DIR", "2024")
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE_URL)
    assert create_app().config["DATA_DIR"] == "2024"


def test_data_dir_defaults_to_the_xdg_data_home(
    env_app: Callable[..., Flask], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert env_app().config["DATA_DIR"] == str(tmp_path / "data" / "pixstream")


def test_default_data_dir_is_the_same_from_any_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server and a ``flask seed-pix`` run elsewhere must find one database."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    seen = set()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        for xdg in (None, "", "relative/data"):  # unset, empty, relative: all ignored
            if xdg is None:
                monkeypatch.delenv("XDG_DATA_HOME", raising=False)
            else:
                monkeypatch.setenv("XDG_DATA_HOME", xdg)
            seen.add(default_data_dir())
    assert seen == {str(tmp_path / "home" / ".local" / "share" / "pixstream")}
