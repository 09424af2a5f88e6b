"""Liveness, readiness and metrics for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from pixstream import db, metrics, store
from pixstream.api.problems import problem
from pixstream.errors import DatabaseUnavailable
from pixstream.runtime import runtime

bp = Blueprint("health", __name__)

_PROBE_TIMEOUT = 0.8  # seconds, for the database and listener checks together


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
        # Probes time out quickly (Kubernetes: 1 s); so must this check.
        with db.transaction(current.pool, timeout=_PROBE_TIMEOUT) as conn:
            store.ping(conn)
    except DatabaseUnavailable as exc:
        failures.append(f"database: {exc}")
    # A worker that just started may still be connecting: allow it a moment.
    if not current.listener.wait_connected(_PROBE_TIMEOUT / 2):
        failures.append("listener: not listening on pix_inserted")
    if failures:
        return problem(503, "Not ready", "; ".join(failures), headers={"Retry-After": "2"})
    return jsonify(status="ready", database="ok", listener="ok")


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus text exposition, summed over this host's workers."""
    return Response(metrics.exposition(), 200, content_type=metrics.CONTENT_TYPE)
