"""One check of RFC 9457 problem documents, for Flask test responses and live replies."""

from __future__ import annotations

import json
from typing import Any

PROBLEM = "application/problem+json"


def assert_problem(
    response: Any, status: int, *, retry_after: bool = False, body: bool = True
) -> dict[str, Any]:
    """Assert ``response`` is a problem of ``status``; return its document.

    ``response`` is a Flask ``TestResponse`` or a ``httpclient.Reply``.
    ``body=False`` is for HEAD, whose answer has the headers and no body.
    """
    if hasattr(response, "status_code"):  # Flask's test client
        actual, data = response.status_code, response.data
        content_type, retry = response.mimetype, response.headers.get("Retry-After")
    else:
        actual, data = response.status, response.body
        content_type = (response.header("Content-Type") or "").split(";")[0]
        retry = response.header("Retry-After")
    assert actual == status, (actual, data[:300])
    assert content_type == PROBLEM, content_type
    if retry_after:
        assert retry is not None and retry.isdigit() and int(retry) >= 1, retry
    if not body:
        assert data == b""
        return {}
    document = json.loads(data)
    assert set(document) == {"type", "title", "status", "detail"}, document
    assert type(document["status"]) is int and document["status"] == status
    for key in ("type", "title", "detail"):
        assert isinstance(document[key], str) and document[key], key
    return document  # type: ignore[no-any-return]
