"""RFC 9457 problem documents for every error, the domain's and Flask's own."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from pixstream.errors import PixstreamError

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    type_: str = "about:blank",
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"type": type_, "title": title, "status": status, "detail": detail}
    response = Response(json.dumps(body, ensure_ascii=False), status, mimetype=PROBLEM_JSON)
    response.headers.update(headers or {})
    return response


def _slug(error: PixstreamError) -> str:
    name = type(error).__name__
    return "".join("-" + c.lower() if c.isupper() else c for c in name).lstrip("-")


def _domain_error(error: PixstreamError) -> Response:
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    challenge = getattr(error, "www_authenticate", None)
    if challenge:
        headers["WWW-Authenticate"] = challenge
    detail = str(error) or error.title
    if error.public_detail is not None:
        # The cause (a driver's text: hosts, users) is for operators, with the request id.
        log.warning("%s: %s", error.title, detail)
        detail = error.public_detail
    return problem(
        error.status,
        error.title,
        detail,
        type_=f"urn:pixstream:problem:{_slug(error)}",
        headers=headers,
    )


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    headers = {k: v for k, v in error.get_headers() if k.lower() in ("allow", "retry-after")}
    return problem(status, error.name, error.description or error.name, headers=headers)


def _unexpected(error: Exception) -> Response:
    log.exception("unhandled error", exc_info=error)
    return problem(500, "Internal Server Error", "An unexpected error occurred.")


def init_app(app: Flask) -> None:
    app.register_error_handler(PixstreamError, _domain_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
