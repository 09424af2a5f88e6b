"""Path parameters and content negotiation, validated at the edge."""

from __future__ import annotations

import re

from werkzeug.datastructures import MIMEAccept

from pixstream.errors import InvalidRequest, NotAcceptable

_ISPB = re.compile(r"[0-9]{8}")
_COUNT = re.compile(r"[0-9]{1,12}")

SINGLE = "application/json"
MULTIPART = "multipart/json"


def parse_ispb(value: str) -> str:
    if not _ISPB.fullmatch(value):
        raise InvalidRequest(f"ispb must be exactly 8 digits, got {value!r}")
    return value


def parse_count(value: str, maximum: int) -> int:
    if not _COUNT.fullmatch(value) or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"number must be an integer from 1 to {maximum}, got {value!r}")
    return int(value)


def wants_multipart(accept: MIMEAccept, raw_header: str | None) -> bool:
    """Choose between one message and a batch from the Accept header.

    No Accept means one message. With q-values the higher wins; on a tie an
    explicit ``multipart/json`` beats a wildcard, since asking for it by name
    is the only way to get a batch.
    """
    if raw_header is None or not raw_header.strip():
        return False
    single, batch = accept.quality(SINGLE), accept.quality(MULTIPART)
    if single <= 0 and batch <= 0:
        raise NotAcceptable(
            f"this resource is available as {SINGLE} (one message) or {MULTIPART} "
            f"(a batch); Accept was {raw_header!r}"
        )
    if batch != single:
        return batch > single
    named = [value for value, _ in accept]
    if MULTIPART not in named:
        return False
    return SINGLE not in named or named.index(MULTIPART) < named.index(SINGLE)
