"""The operators' console: server-rendered pages under /console (docs/operations.md#console).

Access: with PIXSTREAM_AUTH=none the console is open, like everything else,
and every page says so in a banner. Otherwise only an administrator's token
opens it: entered once on the login page and kept in a cookie (HttpOnly,
SameSite=Strict, Secure when the request came over TLS), checked on every
request through the access service's cache.

Every action is a confirmation page (GET) then a POST carrying a CSRF token:
a random value kept in a SameSite=Strict cookie and repeated in the form
(double submit), compared in constant time. Actions are logged with who did
them. Pages answer errors as HTML pages; /console/api/ answers problem+json.
No CDN and no build step: one stylesheet and one script, served from the package.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from werkzeug.exceptions import BadRequest, HTTPException, NotFound
from werkzeug.wrappers import Response as BaseResponse

from pixstream.api import auth
from pixstream.api.problems import problem
from pixstream.errors import PixstreamError, Unauthorized
from pixstream.runtime import runtime
from pixstream.validation import parse_ispb

log = logging.getLogger(__name__)

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

TOKEN_COOKIE = "pixstream_console"
CSRF_COOKIE = "pixstream_console_csrf"
_OPEN_ENDPOINTS = ("console.login", "console.static")


def _api() -> bool:
    return request.path.startswith("/console/api/")


# -- access -----------------------------------------------------------------------------


def _cookie(response: BaseResponse, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/console", httponly=True,
        secure=request.is_secure, samesite="Strict",
    )  # fmt: skip


def _admin_from_cookie() -> str | None:
    """Who the console cookie's token belongs to, if an administrator; else None."""
    from pixstream.access import CredentialRejected

    token = request.cookies.get(TOKEN_COOKIE, "")
    if not token:
        return None
    try:
        principal = runtime().access.authenticate_token(token)
    except CredentialRejected:
        return None
    if not principal.admin:
        return None
    return f"admin credential {principal.credential_id} ({principal.label or 'no label'})"


@bp.before_request
def _guard() -> BaseResponse | None:
    """Open with auth off; administrators only otherwise (login page, then a cookie)."""
    g.console_open = auth.mode() == "none"
    if g.console_open:
        g.console_actor = f"anonymous at {request.remote_addr} (PIXSTREAM_AUTH=none)"
        return None
    if request.endpoint in _OPEN_ENDPOINTS:
        return None
    actor = _admin_from_cookie()
    if actor is None:
        if _api():
            raise Unauthorized("log in to the console with an administrator's token first")
        return redirect(url_for("console.login", next=request.full_path.rstrip("?")))
    g.console_actor = actor
    return None


def _csrf_token() -> str:
    """This browser's CSRF value (a cookie, set on the response if new)."""
    if "csrf" not in g:
        g.csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
    return str(g.csrf)


def _check_csrf() -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = request.form.get("csrf", "")
    if not cookie or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise BadRequest(
            "the form's security token is missing or stale (cookies off, or the form is "
            "older than a login): go back, reload the page and try again"
        )


@bp.after_request
def _set_csrf_cookie(response: Response) -> Response:
    if "csrf" in g and request.cookies.get(CSRF_COOKIE) != g.csrf:
        _cookie(response, CSRF_COOKIE, g.csrf)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


@bp.context_processor
def _helpers() -> dict[str, Any]:
    return {"csrf_token": _csrf_token, "age": _age, "when": _when}


def _page(template: str, **context: Any) -> str:
    return render_template(
        f"console/{template}", console_open=g.get("console_open", False),
        actor=g.get("console_actor"), **context,
    )  # fmt: skip


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | str:
    """The administrator's token, once: kept in an HttpOnly, SameSite=Strict cookie."""
    target = request.values.get("next", "")
    # Only a path of this console: never a redirect to another site.
    if not target.startswith("/console") or urlsplit(target).netloc:
        target = url_for("console.overview")
    if auth.mode() == "none":
        return redirect(target)
    error = None
    if request.method == "POST":
        _check_csrf()
        token = request.form.get("token", "").strip()
        from pixstream.access import CredentialRejected

        try:
            principal = runtime().access.authenticate_token(token) if token else None
        except CredentialRejected as rejected:
            principal, error = None, f"this token is {rejected.reason}"
        if principal is not None and not principal.admin:
            principal, error = None, "this token is an institution's, not an administrator's"
        if principal is not None:
            log.info("console: admin credential %s logged in", principal.credential_id)
            response = redirect(target)
            _cookie(response, TOKEN_COOKIE, token)
            return response
        error = error or "enter an administrator's token"
    status = 401 if error else 200
    return Response(_page("login.html", error=error, target=target), status)


@bp.post("/logout")
def logout() -> BaseResponse:
    _check_csrf()
    response = redirect(url_for("console.login"))
    response.delete_cookie(TOKEN_COOKIE, path="/console")
    return response


# -- pages ------------------------------------------------------------------------------


@bp.get("/")
def overview() -> str:
    return _page("overview.html", overview=runtime().console.overview())


@bp.get("/institutions")
def institutions() -> str:
    query = request.args.get("q", "").strip()
    rows = runtime().console.institutions()
    if query:
        rows = [row for row in rows if query in row.ispb]
    return _page("institutions.html", rows=rows, query=query)


@bp.get("/institutions/<ispb>")
def institution(ispb: str) -> str:
    ispb = parse_ispb(ispb)
    page = runtime().console.institution(ispb)
    credentials = runtime().access.list_credentials(ispb)
    # What the action just done was, from numbers only: no text from the URL reaches the page.
    done = ""
    closed, released = request.args.get("closed", type=int), request.args.get("released", type=int)
    revoked = request.args.get("revoked", type=int)
    if closed is not None and released is not None:
        done = f"Stream {closed} closed; {released} message(s) back to the queue."
    elif revoked is not None:
        done = f"Credential {revoked} revoked."
    return _page("institution.html", page=page, credentials=credentials, done=done)


@bp.route("/institutions/<ispb>/streams/<int:stream_id>/close", methods=["GET", "POST"])
def close_stream(ispb: str, stream_id: int) -> BaseResponse | str:
    """Confirm (GET), then close (POST): the stream's batch goes back to the queue."""
    ispb = parse_ispb(ispb)
    if request.method == "GET":
        consequence = (
            "Its unconfirmed batch goes back to the queue and is redelivered to another "
            "stream; its collector's next request answers 410."
        )
        return _page("confirm.html", ispb=ispb, action="close", subject=f"stream {stream_id}",
                     consequence=consequence)  # fmt: skip
    _check_csrf()
    released = runtime().console.close_stream(ispb, stream_id, g.console_actor)
    if released is None:
        raise NotFound(f"ISPB {ispb} has no open stream {stream_id} (closed already?)")
    return redirect(url_for("console.institution", ispb=ispb, closed=stream_id, released=released))


@bp.route("/institutions/<ispb>/credentials/<int:credential_id>/revoke", methods=["GET", "POST"])
def revoke_credential(ispb: str, credential_id: int) -> BaseResponse | str:
    """Confirm (GET), then revoke (POST) one of the institution's credentials."""
    ispb = parse_ispb(ispb)
    access = runtime().access
    credential = access.get_credential(credential_id)
    if credential is None or credential.ispb != ispb:
        raise NotFound(f"ISPB {ispb} has no credential {credential_id}")
    if request.method == "GET":
        return _page("confirm.html", ispb=ispb, action="revoke",
                     subject=f"{credential.kind} credential {credential_id} ({credential.label})",
                     consequence="Every host refuses it within a second; the institution "
                     "needs a new one to collect again.")  # fmt: skip
    _check_csrf()
    access.revoke(credential_id)
    log.info(
        "console: %s revoked credential %s of ISPB %s", g.console_actor, credential_id, ispb,
        extra={"event": "console_revoke", "actor": g.console_actor, "ispb": ispb,
               "credential": credential_id},
    )  # fmt: skip
    return redirect(url_for("console.institution", ispb=ispb, revoked=credential_id))


# -- live data (the pages' script) ------------------------------------------------------


@bp.get("/api/overview")
def overview_json() -> Response:
    """The overview's figures, fetched by the page every 5 s (no wait: nothing is held)."""
    view = runtime().console.overview()
    return jsonify(
        backlog=view.backlog,
        oldest_age=view.oldest_age,
        open_streams=view.open_streams,
        ispbs_streaming=view.ispbs_streaming,
        ispbs_at_limit=view.ispbs_at_limit,
        stream_limit=view.stream_limit,
        rate_429=round(view.rate_429, 3),
        rate_503=round(view.rate_503, 3),
        hosts=[
            {
                "name": h.name,
                "alive": h.alive,
                "listener": h.listener,
                "processes": len(h.live),
                "silent_for": round(h.silent_for, 1),
            }
            for h in view.hosts
        ],
        series=[list(point) for point in view.series],
    )


@bp.route("/<path:rest>", methods=["GET", "POST"])
def not_found(rest: str) -> Response:
    raise NotFound(f"the console has no page /console/{rest}")


# -- errors -----------------------------------------------------------------------------


def _error(status: int, title: str, detail: str) -> Response:
    if _api():
        return problem(status, title, detail)
    body = _page("error.html", status=status, title=title, detail=detail)
    return Response(body, status, mimetype="text/html")


@bp.errorhandler(PixstreamError)
def _domain_error(error: PixstreamError) -> Response:
    detail = error.public_detail or str(error) or error.title
    if error.public_detail is not None:
        log.warning("%s: %s", error.title, error)
    response = _error(error.status, error.title, detail)
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


@bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response:
    return _error(error.code or 500, error.name, error.description or error.name)


@bp.errorhandler(Exception)
def _unexpected(error: Exception) -> Response:
    log.exception("console: unexpected error", exc_info=error)
    return _error(500, "Internal Server Error", "An unexpected error occurred; see the log.")


# -- formatting -------------------------------------------------------------------------


def _age(seconds: float | None) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``; an en dash for none."""
    if seconds is None:
        return "\u2013"  # an en dash
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _when(moment: datetime | None) -> str:
    """A time as an age (``12 s ago``), with the UTC time for a title."""
    if moment is None:
        return "\u2013"  # an en dash
    return _age((datetime.now(UTC) - moment).total_seconds()) + " ago"
