"""Checks on values from outside (URL paths, command-line arguments), shared by the
HTTP API and the CLI: neither layer reaches into the other for them."""

from __future__ import annotations

import re

from pixstream.errors import InvalidRequest

_ISPB = re.compile(r"[0-9]{8}")
_COUNT = re.compile(r"[0-9]{1,12}")


def parse_ispb(value: str) -> str:
    """``value`` if it is an ISPB (exactly 8 digits); InvalidRequest otherwise."""
    if not _ISPB.fullmatch(value):
        raise InvalidRequest(f"ispb must be exactly 8 digits, got {value!r}")
    return value


def parse_count(value: str, maximum: int) -> int:
    """``value`` as an integer from 1 to ``maximum``; InvalidRequest otherwise."""
    if not _COUNT.fullmatch(value) or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"number must be an integer from 1 to {maximum}, got {value!r}")
    return int(value)
