"""Settings: defaults, then ``PIXSTREAM_*`` environment variables, then test overrides.

Validation happens once, at start-up, so that a typo stops the service with a
message naming the variable instead of surfacing as a confusing runtime error.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Config

from pixstream import metrics_bind
from pixstream.errors import ConfigError

ENV_PREFIX = "PIXSTREAM"

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,
    "DATA_DIR": None,  # default_data_dir(), resolved when the settings are loaded
    "LONG_POLL_SECONDS": 8,
    "STREAM_IDLE_SECONDS": 60,
    "MAX_STREAMS_PER_ISPB": 6,
    "MAX_BATCH": 10,
    # Test data only: never in production, whatever the auth mode.
    "UTIL_ROUTES": False,
    "UTIL_MAX_MESSAGES": 100_000,
    "POOL_SIZE": 10,
    "POOL_TIMEOUT_SECONDS": 3,
    "SWEEP_SECONDS": 10,
    # An idle stream's long polls claim in the database once in this many; the
    # others trust the listener's silence (quiet.py). 1: every poll claims.
    "IDLE_CLAIM_EVERY": 5,
    # Confirmed messages, finished pulls and closed streams are removed this
    # many hours after (fractions allowed); unconfirmed messages never are.
    "RETENTION_HOURS": 168,
    "LOG_FORMAT": "text",
    "LOG_LEVEL": "INFO",
    # Abuse limits, per process (docs/security.md, "Rate and flood limits").
    "RATE_PER_ISPB": 1000,  # stream requests per second per ISPB
    "RATE_BURST": 1000,
    "MAX_REQUESTS_PER_ID": 16,  # outstanding requests on one stream id; more: 409
    "MAX_WAITING": 5000,  # long polls waiting at once; more: 503
    "STREAM_LOCK_TIMEOUT_SECONDS": 1,  # longest wait for a stream's row lock; then 503
    # Expected wait for a pooled connection beyond which a stream start is
    # refused at once (503; limits.Admission). None: the long-poll window
    # minus the pool timeout (at least half the pool timeout, at most the
    # window): a start that would not get a connection within its window.
    "SHED_WAIT_SECONDS": None,
    # Access control (docs/security.md): who may read which ISPB's payments.
    "AUTH": "none",
    "MTLS_HEADER": "X-SSL-Client-Cert",
    "TRUSTED_PROXIES": [],
    "METRICS_TOKEN": None,
    # host:port where gunicorn's master serves /metrics instead of the public port.
    "METRICS_BIND": None,
    "CREDENTIAL_CACHE_SECONDS": 30,
    # ISPBs exported with a label of their own in the backlog gauges (0: totals only).
    "METRICS_TOP_ISPBS": 10,
}

AUTH_MODES = ("none", "token", "mtls")


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
    # Secrets and header names are strings as written: a numeric token must keep its zeros.
    for key in ("METRICS_TOKEN", "MTLS_HEADER", "METRICS_BIND"):
        if f"{ENV_PREFIX}_{key}" in os.environ:
            config[key] = os.environ[f"{ENV_PREFIX}_{key}"]
    if test_config is not None:
        config.from_mapping(test_config)
    if config["SHED_WAIT_SECONDS"] is None:
        window, pool = config["LONG_POLL_SECONDS"], config["POOL_TIMEOUT_SECONDS"]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in (window, pool)):
            config["SHED_WAIT_SECONDS"] = min(window, max(pool / 2, window - pool))
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
    _number(config, "IDLE_CLAIM_EVERY", minimum=1, integer=True)
    _number(config, "METRICS_TOP_ISPBS", minimum=0, integer=True)
    _number(config, "RETENTION_HOURS", minimum=0.0001, integer=False)
    _number(config, "RATE_PER_ISPB", minimum=0.001, integer=False)
    _number(config, "RATE_BURST", minimum=1, integer=True)
    _number(config, "MAX_REQUESTS_PER_ID", minimum=1, integer=True)
    _number(config, "MAX_WAITING", minimum=1, integer=True)
    _number(config, "STREAM_LOCK_TIMEOUT_SECONDS", minimum=0.01, integer=False)
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
    _number(config, "SHED_WAIT_SECONDS", minimum=0.01, integer=False)
    if config["SHED_WAIT_SECONDS"] > config["LONG_POLL_SECONDS"]:
        # A start queued longer than its window could not answer in time anyway.
        raise ConfigError(
            f"{_env_name('SHED_WAIT_SECONDS')} ({config['SHED_WAIT_SECONDS']}) must not be "
            f"more than {_env_name('LONG_POLL_SECONDS')} ({config['LONG_POLL_SECONDS']})"
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
    _access(config)
    url = config["DATABASE_URL"]
    if url is not None and (not isinstance(url, str) or ("://" not in url and "=" not in url)):
        raise ConfigError(f"DATABASE_URL is not a PostgreSQL URL or conninfo: {url!r}")
    if not isinstance(config["DATA_DIR"], str) or not config["DATA_DIR"]:
        raise ConfigError(f"{_env_name('DATA_DIR')} must be a directory path")


def parse_proxies(value: Any) -> list[str]:
    """TRUSTED_PROXIES as a list of networks: a JSON list, or a comma-separated string.

    A bare address is a one-address network (``10.0.0.5`` is ``10.0.0.5/32``).
    """
    if value is None or value == "":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        items = [items]
    networks = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            networks.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(
                f"{_env_name('TRUSTED_PROXIES')} must list IP addresses or CIDR networks, "
                f"got {text!r}"
            ) from None
    return networks


def _access(config: Config) -> None:
    """Validate the access-control settings; normalise TRUSTED_PROXIES to network strings."""
    if config["AUTH"] not in AUTH_MODES:
        raise ConfigError(
            f"{_env_name('AUTH')} must be none, token or mtls, got {config['AUTH']!r}"
        )
    header = config["MTLS_HEADER"]
    if not isinstance(header, str) or not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ConfigError(f"{_env_name('MTLS_HEADER')} must be an HTTP header name, got {header!r}")
    config["TRUSTED_PROXIES"] = parse_proxies(config["TRUSTED_PROXIES"])
    if config["AUTH"] == "mtls" and not config["TRUSTED_PROXIES"]:
        # Without a trusted proxy every request would be refused: say so at start-up.
        raise ConfigError(
            f"{_env_name('AUTH')}=mtls needs {_env_name('TRUSTED_PROXIES')}: the addresses of "
            "the proxies that verify client certificates"
        )
    if config["METRICS_TOKEN"] == "":
        config["METRICS_TOKEN"] = None
    token = config["METRICS_TOKEN"]
    if token is not None and (
        not isinstance(token, str) or not re.fullmatch(r"[A-Za-z0-9\-._~+/]{16,}=*", token)
    ):
        # Never echo the value: it is a secret. The characters are a bearer token's (RFC 6750).
        raise ConfigError(
            f"{_env_name('METRICS_TOKEN')} must be 16 or more characters of A-Z a-z 0-9 -._~+/"
        )
    if config["METRICS_BIND"] == "":
        config["METRICS_BIND"] = None
    if config["METRICS_BIND"] is not None:
        try:
            metrics_bind.parse_bind(str(config["METRICS_BIND"]))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    _number(config, "CREDENTIAL_CACHE_SECONDS", minimum=0, integer=False)
