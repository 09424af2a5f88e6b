"""Content negotiation at the edge: one message or a batch, from ``Accept``.

The checks of path values (ISPB, counts) live in :mod:`pixstream.validation`,
shared with the CLI; an InvalidRequest becomes a 400 problem document.
"""

from __future__ import annotations

from werkzeug.datastructures import MIMEAccept

from pixstream.errors import NotAcceptable

SINGLE = "application/json"
MULTIPART = "multipart/json"


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
