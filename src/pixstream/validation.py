"""Checks on values from outside (URL paths, headers, command-line arguments), shared by the
HTTP API and the CLI: neither layer reaches into the other for them."""

from __future__ import annotations

import re

from pixstream.errors import InvalidRequest

_ISPB = re.compile(r"[0-9]{8}")
_COUNT = re.compile(r"[0-9]{1,12}")
_IDEMPOTENCY_KEY = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,255}")


def parse_ispb(value: str) -> str:
    """``value`` if it is an ISPB (exactly 8 digits); InvalidRequest otherwise."""
    if not _ISPB.fullmatch(value):
        raise InvalidRequest(f"ispb must be exactly 8 digits, got {value!r}")
    return value


def parse_idempotency_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` header; InvalidRequest when it cannot be one.

    The IETF httpapi draft makes the value an RFC 8941 sf-string
    (``"abc"``); a bare value is common in practice, so both are taken and
    mean the same key. A key is visible ASCII without ``"`` and ``\\``, the
    two characters an sf-string would have to escape: no escape sequences to
    undo, and the quoted and the bare form of a key cannot be confused. It is
    compared byte for byte and stored as is.
    """
    key = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        # The value itself is not echoed: problem bodies hold no header value.
        if not key:
            found = "it is empty"
        elif len(key) > 255:
            found = f"it has {len(key)} characters"
        else:
            found = "it has a character outside that set"
        raise InvalidRequest(
            "Idempotency-Key must be 1 to 255 visible ASCII characters (0x21-0x7E) "
            f'other than " and \\, bare or in double quotes; {found}'
        )
    return key


def parse_count(value: str, maximum: int) -> int:
    """``value`` as an integer from 1 to ``maximum``; InvalidRequest otherwise."""
    if not _COUNT.fullmatch(value) or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"number must be an integer from 1 to {maximum}, got {value!r}")
    return int(value)
