"""The stream routes: HTTP in, the stream service, HTTP out. No SQL here."""

from __future__ import annotations

from flask import Blueprint, Flask, Response, request
from werkzeug.routing import BaseConverter

from pixstream import metrics
from pixstream.api.params import wants_multipart
from pixstream.errors import NotAcceptable
from pixstream.runtime import runtime
from pixstream.streams import PULL_ID_PATTERN, Delivery
from pixstream.validation import parse_idempotency_key, parse_ispb

bp = Blueprint("streams", __name__, url_prefix="/api/pix/<ispb>/stream")


class PullIdConverter(BaseConverter):
    """Only well-formed ids route to a stream: ``start`` is never taken for one,
    so the 405 for ``DELETE .../stream/start`` lists just GET in Allow."""

    regex = PULL_ID_PATTERN


@bp.record_once
def _register_converter(state: object) -> None:
    app: Flask = state.app  # type: ignore[attr-defined]
    app.url_map.converters["pull_id"] = PullIdConverter


def forbid_head(app: Flask) -> None:
    """Drop the HEAD that Flask adds to GET routes: here it would open or advance a stream."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(f"{bp.name}.") and rule.methods:
            rule.methods.discard("HEAD")


def _pull_next(ispb: str, pull_id: str) -> str:
    return f"/api/pix/{ispb}/stream/{pull_id}"


def _respond(ispb: str, delivery: Delivery, multipart: bool) -> Response:
    documents = delivery.documents
    if not documents:
        response = Response(status=204)
        del response.headers["Content-Type"]  # no body, no type
    elif multipart:
        response = Response(f"[{','.join(documents)}]", 200, mimetype="application/json")
    elif len(documents) == 1:
        response = Response(documents[0], 200, mimetype="application/json")
    else:
        raise NotAcceptable(
            "this id's batch was delivered as multipart/json; repeat it with the same Accept"
        )
    metrics.LONG_POLLS.labels(str(response.status_code)).inc()
    response.headers["Pull-Next"] = _pull_next(ispb, delivery.pull_next)
    response.headers["Cache-Control"] = "no-store"
    return response


def _read_params(ispb: str) -> tuple[str, bool]:
    ispb = parse_ispb(ispb)
    return ispb, wants_multipart(request.accept_mimetypes, request.headers.get("Accept"))


@bp.get("/start")
def start(ispb: str) -> Response:
    ispb, multipart = _read_params(ispb)
    # Read on start only: every other stream request is a repeatable read of its id already.
    header = request.headers.get("Idempotency-Key")
    key = None if header is None else parse_idempotency_key(header)
    service = runtime().streams
    batch = service.settings.max_batch if multipart else 1
    return _respond(ispb, service.start(ispb, batch, idempotency_key=key), multipart)


@bp.get("/<pull_id:interation_id>")
def pull(ispb: str, interation_id: str) -> Response:
    ispb, multipart = _read_params(ispb)
    service = runtime().streams
    batch = service.settings.max_batch if multipart else 1
    return _respond(ispb, service.pull(ispb, interation_id, batch), multipart)


@bp.delete("/<pull_id:interation_id>")
def close(ispb: str, interation_id: str) -> Response:
    ispb = parse_ispb(ispb)
    runtime().streams.close(ispb, interation_id)
    return Response("{}", 200, mimetype="application/json")
