"""Liveness, readiness and metrics for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from pixstream import metrics
from pixstream.api.problems import problem
from pixstream.runtime import runtime

bp = Blueprint("health", __name__)

# Probes time out quickly (Kubernetes: 1 s by default), so must readiness: the
# database ping gets this long, the listener check half as long.
_PROBE_TIMEOUT = 0.8  # seconds


@bp.get("/healthz")
def healthz() -> Response:
    """200 while the process runs: restart it only when this fails."""
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> Response:
    """200 only when this process can serve streams: database and listener up."""
    failures = runtime().readiness(_PROBE_TIMEOUT)
    if failures:
        return problem(503, "Not ready", "; ".join(failures), headers={"Retry-After": "2"})
    return jsonify(status="ready", database="ok", listener="ok")


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus text exposition, summed over this host's workers."""
    return Response(metrics.exposition(), 200, content_type=metrics.CONTENT_TYPE)
