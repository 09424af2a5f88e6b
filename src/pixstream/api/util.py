"""Test-data route: insert random messages. Absent unless PIXSTREAM_UTIL_ROUTES is true;
with access control on, only an admin credential may call it (api/auth.py)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from pixstream.api.params import parse_count, parse_ispb
from pixstream.runtime import runtime
from pixstream.seeding import insert_random

bp = Blueprint("util", __name__, url_prefix="/api/util")


@bp.post("/msgs/<ispb>/<number>")
def insert_messages(ispb: str, number: str) -> tuple[Response, int]:
    ispb = parse_ispb(ispb)
    count = parse_count(number, current_app.config["UTIL_MAX_MESSAGES"])
    inserted = insert_random(runtime().pool, ispb, count)
    return jsonify(inserted=inserted), 201
