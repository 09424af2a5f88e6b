"""Liveness, readiness and metrics for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import NotFound

from pixstream import metrics
from pixstream.api import auth
from pixstream.api.problems import problem
from pixstream.errors import Unauthorized
from pixstream.runtime import runtime

log = logging.getLogger(__name__)

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
    """200 only when this process can serve streams: database and listener up.

    The answer names what is down in fixed words; the cause (a driver's text,
    which can name hosts and users) goes to the log with the request id. A
    pending schema is named with its migrations (no secret in them).
    """
    failures = runtime().readiness(_PROBE_TIMEOUT)
    metrics.READY.set(0 if failures else 1)
    if failures:
        log.warning("not ready: %s", "; ".join(failures))
        return problem(
            503,
            "Not ready",
            "; ".join(_public(failure) for failure in failures),
            headers={"Retry-After": "2"},
        )
    return jsonify(status="ready", database="ok", listener="ok", auth=auth.mode())


def _public(failure: str) -> str:
    """A failure as a probe may show it: the schema's own words (migration names), else the part."""
    part, _, cause = failure.partition(":")
    return f"schema {cause.strip()}" if part == "schema" else f"{part} unavailable"


def _auth_mode_metric() -> bytes:
    """An info-style gauge saying which auth mode this process enforces."""
    return (
        "# HELP pixstream_auth_mode The access-control mode in force (PIXSTREAM_AUTH).\n"
        "# TYPE pixstream_auth_mode gauge\n"
        f'pixstream_auth_mode{{mode="{auth.mode()}"}} 1.0\n'
    ).encode()


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus text exposition, summed over this host's workers.

    With PIXSTREAM_METRICS_TOKEN set, only a scraper sending it as a bearer
    token gets an answer.
    """
    if current_app.config["METRICS_BIND"] is not None:
        # Served by gunicorn's master on that address instead (pixstream.metrics_bind).
        raise NotFound("/metrics is served on PIXSTREAM_METRICS_BIND, not on this port")
    token = current_app.config["METRICS_TOKEN"]
    if token is not None and not auth.metrics_token_ok(token, request.headers.get("Authorization")):
        raise Unauthorized(
            "/metrics needs Authorization: Bearer <PIXSTREAM_METRICS_TOKEN>",
            auth.METRICS_CHALLENGE,
        )
    body = metrics.exposition() + _auth_mode_metric()
    return Response(body, 200, content_type=metrics.CONTENT_TYPE)
