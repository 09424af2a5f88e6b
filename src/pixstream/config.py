"""Settings: defaults, then ``PIXSTREAM_*`` environment variables, then test overrides.

Validation happens once, at start-up, so that a typo stops the service with a
message naming the variable instead of surfacing as a confusing runtime error.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Config

from pixstream.errors import ConfigError

ENV_PREFIX = "PIXSTREAM"

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,
    "DATA_DIR": None,  # default_data_dir(), resolved when the settings are loaded
    "LONG_POLL_SECONDS": 8,
    "STREAM_IDLE_SECONDS": 60,
    "MAX_STREAMS_PER_ISPB": 6,
    "MAX_BATCH": 10,
    "UTIL_ROUTES": True,
    "UTIL_MAX_MESSAGES": 100_000,
    "POOL_SIZE": 10,
    "POOL_TIMEOUT_SECONDS": 3,
    "SWEEP_SECONDS": 10,
    "LOG_FORMAT": "text",
    "LOG_LEVEL": "INFO",
}


def default_data_dir() -> str:
    """Where the embedded PostgreSQL lives unless PIXSTREAM_DATA_DIR says otherwise.

    One place per user, whatever the current directory: the server and a
    ``flask seed-pix`` run from elsewhere must find the same database, not
    start a second, empty one. That place is the XDG data directory,
    ``$XDG_DATA_HOME/pixstream``, or ``~/.local/share/pixstream``.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec ignores a relative XDG_DATA_HOME: it would depend on the directory again.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return str(base / "pixstream")


def load(config: Config, test_config: Mapping[str, Any] | None) -> None:
    """Fill ``config`` from defaults, the environment and ``test_config``, then validate it."""
    config.from_mapping(DEFAULTS)
    config["DATA_DIR"] = default_data_dir()
    config.from_prefixed_env(ENV_PREFIX)
    if os.environ.get("DATABASE_URL"):
        config["DATABASE_URL"] = os.environ["DATABASE_URL"]
    # A path is a string even when it looks like JSON (from_prefixed_env would make "2024" an int).
    if f"{ENV_PREFIX}_DATA_DIR" in os.environ:
        config["DATA_DIR"] = os.environ[f"{ENV_PREFIX}_DATA_DIR"]
    if test_config is not None:
        config.from_mapping(test_config)
    validate(config)


def _env_name(key: str) -> str:
    return key if key == "DATABASE_URL" else f"{ENV_PREFIX}_{key}"


def _number(config: Config, key: str, *, minimum: float, integer: bool) -> None:
    value = config[key]
    kind = int if integer else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value < minimum
    ):
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{_env_name(key)} must be {what} >= {minimum}, got {value!r}")


def validate(config: Config) -> None:
    """Raise ConfigError naming the first invalid setting."""
    _number(config, "LONG_POLL_SECONDS", minimum=0.1, integer=False)
    _number(config, "STREAM_IDLE_SECONDS", minimum=1, integer=False)
    _number(config, "MAX_STREAMS_PER_ISPB", minimum=1, integer=True)
    _number(config, "MAX_BATCH", minimum=1, integer=True)
    _number(config, "UTIL_MAX_MESSAGES", minimum=1, integer=True)
    _number(config, "POOL_SIZE", minimum=1, integer=True)
    _number(config, "POOL_TIMEOUT_SECONDS", minimum=0.1, integer=False)
    _number(config, "SWEEP_SECONDS", minimum=0.1, integer=False)
    if not isinstance(config["UTIL_ROUTES"], bool):
        raise ConfigError(
            f"{_env_name('UTIL_ROUTES')} must be true or false, got {config['UTIL_ROUTES']!r}"
        )
    if config["STREAM_IDLE_SECONDS"] <= config["LONG_POLL_SECONDS"]:
        # A stream must never expire while its own long poll is still waiting.
        raise ConfigError(
            f"{_env_name('STREAM_IDLE_SECONDS')} ({config['STREAM_IDLE_SECONDS']}) must be longer "
            f"than {_env_name('LONG_POLL_SECONDS')} ({config['LONG_POLL_SECONDS']})"
        )
    if config["POOL_TIMEOUT_SECONDS"] >= config["LONG_POLL_SECONDS"] + 2:
        # A request that cannot get a connection must still answer (503) close
        # to the long-poll window, never long after it.
        raise ConfigError(
            f"{_env_name('POOL_TIMEOUT_SECONDS')} ({config['POOL_TIMEOUT_SECONDS']}) must be "
            f"less than {_env_name('LONG_POLL_SECONDS')} + 2 ({config['LONG_POLL_SECONDS']} + 2)"
        )
    if config["LOG_FORMAT"] not in ("text", "json"):
        raise ConfigError(
            f"{_env_name('LOG_FORMAT')} must be text or json, got {config['LOG_FORMAT']!r}"
        )
    if config["LOG_LEVEL"] not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            f"{_env_name('LOG_LEVEL')} must be DEBUG, INFO, WARNING or ERROR, "
            f"got {config['LOG_LEVEL']!r}"
        )
    url = config["DATABASE_URL"]
    if url is not None and (not isinstance(url, str) or ("://" not in url and "=" not in url)):
        raise ConfigError(f"DATABASE_URL is not a PostgreSQL URL or conninfo: {url!r}")
    if not isinstance(config["DATA_DIR"], str) or not config["DATA_DIR"]:
        raise ConfigError(f"{_env_name('DATA_DIR')} must be a directory path")
