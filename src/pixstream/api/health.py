"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from pixstream import db, store
from pixstream.api.problems import problem
from pixstream.errors import DatabaseUnavailable
from pixstream.runtime import runtime

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the process runs: restart it only when this fails."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    """200 only when this process can serve streams: database and listener up."""
    current = runtime()
    failures = []
    try:
        with db.transaction(current.pool) as conn:
            store.ping(conn)
    except DatabaseUnavailable as exc:
        failures.append(f"database: {exc}")
    if not current.listener.connected:
        failures.append("listener: not listening on pix_inserted")
    if failures:
        return problem(503, "Not ready", "; ".join(failures), headers={"Retry-After": "2"})
    return jsonify(status="ready", database="ok", listener="ok")
