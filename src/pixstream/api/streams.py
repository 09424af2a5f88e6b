"""The stream routes: HTTP in, the stream service, HTTP out. No SQL here."""

from __future__ import annotations

from flask import Blueprint, Response, request
from werkzeug.exceptions import MethodNotAllowed

from pixstream.api.params import parse_ispb, wants_multipart
from pixstream.errors import NotAcceptable, StreamNotFound
from pixstream.runtime import runtime
from pixstream.streams import Delivery, is_well_formed_pull_id

bp = Blueprint("streams", __name__, url_prefix="/api/pix/<ispb>/stream")

_ALLOWED = ["GET", "DELETE"]


@bp.before_request
def _refuse_head() -> None:
    # Flask answers HEAD with the GET view; here that would open or advance a stream.
    if request.method == "HEAD":
        raise MethodNotAllowed(valid_methods=_ALLOWED)


def _pull_next(ispb: str, pull_id: str) -> str:
    return f"/api/pix/{ispb}/stream/{pull_id}"


def _respond(ispb: str, delivery: Delivery, multipart: bool) -> Response:
    documents = delivery.documents
    if not documents:
        response = Response(status=204)
    elif multipart:
        response = Response(f"[{','.join(documents)}]", 200, mimetype="application/json")
    elif len(documents) == 1:
        response = Response(documents[0], 200, mimetype="application/json")
    else:
        raise NotAcceptable(
            "this id's batch was delivered as multipart/json; repeat it with the same Accept"
        )
    response.headers["Pull-Next"] = _pull_next(ispb, delivery.pull_next)
    response.headers["Cache-Control"] = "no-store"
    return response


def _read_params(ispb: str) -> tuple[str, bool]:
    ispb = parse_ispb(ispb)
    return ispb, wants_multipart(request.accept_mimetypes, request.headers.get("Accept"))


@bp.get("/start")
def start(ispb: str) -> Response:
    ispb, multipart = _read_params(ispb)
    service = runtime().streams
    batch = service.settings.max_batch if multipart else 1
    return _respond(ispb, service.start(ispb, batch), multipart)


@bp.get("/<interation_id>")
def pull(ispb: str, interation_id: str) -> Response:
    ispb, multipart = _read_params(ispb)
    _check_id(ispb, interation_id)
    service = runtime().streams
    batch = service.settings.max_batch if multipart else 1
    return _respond(ispb, service.pull(ispb, interation_id, batch), multipart)


@bp.delete("/<interation_id>")
def close(ispb: str, interation_id: str) -> Response:
    if interation_id == "start":
        raise MethodNotAllowed(valid_methods=["GET"])
    ispb = parse_ispb(ispb)
    _check_id(ispb, interation_id)
    runtime().streams.close(ispb, interation_id)
    return Response("{}", 200, mimetype="application/json")


def _check_id(ispb: str, interation_id: str) -> None:
    if not is_well_formed_pull_id(interation_id):
        raise StreamNotFound(f"no stream of ISPB {ispb} has the id {interation_id!r}")
