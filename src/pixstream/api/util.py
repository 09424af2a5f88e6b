"""Test-data route: insert random messages. Absent unless PIXSTREAM_UTIL_ROUTES is true;
with access control on, only an admin credential may call it (api/auth.py). The
insert is one transaction (201 with every row, or 503 with none) and leaves the
gevent hub free for the worker's long polls (seeding.insert_random_atomic)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from pixstream.runtime import runtime
from pixstream.seeding import insert_random_atomic
from pixstream.validation import parse_count, parse_ispb

bp = Blueprint("util", __name__, url_prefix="/api/util")


@bp.post("/msgs/<ispb>/<number>")
def insert_messages(ispb: str, number: str) -> tuple[Response, int]:
    ispb = parse_ispb(ispb)
    count = parse_count(number, current_app.config["UTIL_MAX_MESSAGES"])
    inserted = insert_random_atomic(runtime().pool, ispb, count)  # all or nothing: 503
    return jsonify(inserted=inserted), 201
