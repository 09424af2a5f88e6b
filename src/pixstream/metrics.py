"""Prometheus metrics, aggregated across gunicorn workers.

gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR before the workers fork, so each
worker writes its samples to shared files and any worker can answer a scrape
for all of them. Without it (dev server, tests) the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MESSAGES_INSERTED = Counter("pixstream_messages_inserted", "Messages inserted by this service.")
MESSAGES_DELIVERED = Counter(
    "pixstream_messages_delivered", "Messages handed to a stream (first delivery or again)."
)
MESSAGES_CONFIRMED = Counter("pixstream_messages_confirmed", "Messages confirmed by the next call.")
MESSAGES_REDELIVERED = Counter(
    "pixstream_messages_redelivered", "Messages delivered again after being given back."
)
MESSAGES_REQUEUED = Counter(
    "pixstream_messages_requeued",
    "Unconfirmed messages given back to the queue, by reason.",
    ["reason"],
)
STREAMS_OPENED = Counter("pixstream_streams_opened", "Streams opened.")
STREAMS_CLOSED = Counter("pixstream_streams_closed", "Streams closed by DELETE.")
STREAMS_EXPIRED = Counter("pixstream_streams_expired", "Streams expired after the idle window.")
STREAMS_REFUSED = Counter("pixstream_streams_refused", "Stream starts refused with 429.")
REQUESTS_REFUSED = Counter(
    "pixstream_requests_refused",
    "Stream requests refused by an abuse limit, by reason: rate (429), flood (409),"
    " waiters (503, too many long polls waiting), lock_timeout (503, stream locked elsewhere),"
    " shed_start (503, a start that would not get a database connection within its window).",
    ["reason"],
)
STREAMS_OPEN = Gauge(
    "pixstream_streams_open", "Streams open now (all hosts).", multiprocess_mode="mostrecent"
)
LONG_POLLS = Counter("pixstream_long_polls", "Reads answered, by status.", ["status"])
WAITING = Gauge(
    "pixstream_waiting_requests", "Reads waiting for a message now.", multiprocess_mode="livesum"
)
WAKEUP_LATENCY = Histogram(
    "pixstream_wakeup_latency_seconds",
    "From a notification reaching the process to the woken read's answer being ready.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
CLAIM_DURATION = Histogram(
    "pixstream_claim_duration_seconds",
    "One read transaction: lock, confirm, claim, advance.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
)
PURGED = Counter(
    "pixstream_purged",
    "Rows removed by the retention (PIXSTREAM_RETENTION_HOURS): messages, pulls, streams.",
    ["what"],
)
IDLE_CLAIMS_SKIPPED = Counter(
    "pixstream_idle_claims_skipped",
    "Long polls on an idle stream that waited without a database transaction:"
    " the listener heard nothing for the ISPB since the stream's last empty claim.",
)
QUIET_TOUCHES = Counter(
    "pixstream_quiet_touches",
    "Last-seen times written in batches for the long polls that skipped their claim.",
)
POOL_IN_USE = Gauge(
    "pixstream_pool_connections_in_use", "Pooled connections lent out.", multiprocess_mode="livesum"
)
POOL_WAITING = Gauge(
    "pixstream_pool_requests_waiting",
    "Requests waiting for a pooled connection.",
    multiprocess_mode="livesum",
)
WAKEUP_CLAIM_FAILURES = Counter(
    "pixstream_wakeup_claim_failures",
    "Claims of woken long polls that failed (database busy or unavailable): the read"
    " answered 204 at its window's end instead of 503, its stream intact.",
)
LISTENER_RECONNECTS = Counter("pixstream_listener_reconnects", "LISTEN connections re-made.")
LISTENER_ERRORS = Counter(
    "pixstream_listener_errors",
    "Unexpected exceptions caught in the listener thread (each followed by a reconnect).",
)
LISTENER_CONNECTED = Gauge(
    "pixstream_listener_connected",
    "1 while this process listens on pix_inserted.",
    multiprocess_mode="livemin",
)
HTTP_RESPONSES = Counter(
    "pixstream_http_responses", "Responses answered, by HTTP status code.", ["status"]
)
# Computed by the sweeper from the queued index and the open streams' batches
# (console.py), never by a scrape: a scrape reads the last values written.
BACKLOG = Gauge(
    "pixstream_backlog_messages",
    "Unconfirmed messages (queued, or delivered and not yet confirmed), all ISPBs.",
    multiprocess_mode="mostrecent",
)
OLDEST_UNCONFIRMED = Gauge(
    "pixstream_oldest_unconfirmed_age_seconds",
    "Age of the oldest unconfirmed message, all ISPBs (0 when none).",
    multiprocess_mode="mostrecent",
)
ISPB_BACKLOG = Gauge(
    "pixstream_ispb_backlog_messages",
    "Unconfirmed messages of the ISPBs with the largest backlogs (PIXSTREAM_METRICS_TOP_ISPBS);"
    " 0 for an ISPB that left the top.",
    ["ispb"],
    multiprocess_mode="mostrecent",
)
ISPB_OLDEST_UNCONFIRMED = Gauge(
    "pixstream_ispb_oldest_unconfirmed_age_seconds",
    "Age of the oldest unconfirmed message of the ISPBs with the oldest ones (top N).",
    ["ispb"],
    multiprocess_mode="mostrecent",
)
READY = Gauge(
    "pixstream_ready",
    "1 while this process is ready (database, listener, schema), as /readyz and each sweep see it.",
    multiprocess_mode="livemin",
)
GAUGES_UPDATED = Gauge(
    "pixstream_backlog_computed_timestamp_seconds",
    "When the sweeper last computed the backlog gauges (Unix time).",
    multiprocess_mode="max",
)

# This process's own refusals, for its heartbeat (console.py): counts, not rates.
_local_statuses: dict[int, int] = {}


def count_response(status: int) -> None:
    """Count one response, for /metrics and for this process's heartbeat."""
    HTTP_RESPONSES.labels(str(status)).inc()
    if status in (429, 503):
        _local_statuses[status] = _local_statuses.get(status, 0) + 1


def local_refusals() -> tuple[int, int]:
    """(429s, 503s) this process answered since it started."""
    return _local_statuses.get(429, 0), _local_statuses.get(503, 0)


def local_value(metric: Counter | Gauge) -> float:
    """An unlabelled metric's value in this process only (not summed over workers)."""
    return float(metric._value.get())  # type: ignore[union-attr]


# The text format every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    """Render every metric of every worker of this host."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)
