"""Named SQL, parsed once from ``queries.sql``, and the ordered schema migrations."""

from __future__ import annotations

import re
from importlib import resources
from typing import NamedTuple

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


QUERIES: dict[str, str] = _parse(
    resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
)


class Migration(NamedTuple):
    """One schema file: applied once, in order, recorded by name."""

    name: str
    sql: str


def migrations() -> list[Migration]:
    """Return the migration files in the order they must be applied."""
    folder = resources.files(__package__).joinpath("migrations")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [Migration(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]
