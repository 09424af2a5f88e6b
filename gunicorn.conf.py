"""gunicorn settings for pixstream: gevent workers holding thousands of long polls.

Every value can be overridden on the command line or with GUNICORN_CMD_ARGS.
"""

import json
import multiprocessing
import os
import shutil
import signal
import tempfile

from gunicorn import util

# The Procfile convention: listen on $PORT, on every interface.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

worker_class = "gevent"
# Requests are I/O-bound; a couple of processes per core keep both cores busy.
workers = int(os.environ.get("WEB_CONCURRENCY", min(multiprocessing.cpu_count() * 2 + 1, 8)))
# A waiting long poll is one greenlet and no database connection.
worker_connections = int(os.environ.get("PIXSTREAM_WORKER_CONNECTIONS", 10000))

_long_poll = float(os.environ.get("PIXSTREAM_LONG_POLL_SECONDS", 8))
# Longer than any long poll, so that a waiting request is never taken for a hung worker.
timeout = int(_long_poll) + 30
graceful_timeout = int(_long_poll) + 5
# Collectors call again at once; a short keep-alive lets a stopping worker's
# idle connections close well within graceful_timeout.
keepalive = 5

# Never preload: each worker must open its own pool and listener after fork,
# and gevent must patch before psycopg is imported.
preload_app = False

# Several instances may share a host (and the tests start many): no control socket.
control_socket_disable = True

accesslog = "-"
# No request header but the request id: never %({authorization}i)s, nor the
# mTLS certificate header. Tokens must not reach a log (docs/security.md); a
# path holds no secret (stream ids are bound to their ISPB's credential).
access_log_format = '%(h)s "%(r)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s'

# Metrics: every worker writes to this directory, any worker answers a scrape.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="pixstream-metrics-")


def on_starting(server):
    """Raise the open-files limit for the workers; start from empty metric files.

    Every long poll holds a socket: worker_connections of them need a limit
    well above the usual 1,024. Workers inherit the master's limit. Old
    workers' metric samples are not this run's.
    """
    from pixstream import oslimits  # standard library only: safe before the fork

    limit = oslimits.raise_open_files_limit(server.cfg.worker_connections + oslimits.HEADROOM)
    (server.log.info if limit.enough and not limit.error else server.log.warning)(str(limit))
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def when_ready(server):
    """Serve /metrics on PIXSTREAM_METRICS_BIND, if set, from the master (metrics_bind)."""
    bind = os.environ.get("PIXSTREAM_METRICS_BIND")
    if bind:
        from pixstream import metrics_bind  # standard library and prometheus_client only

        try:
            metrics_bind.serve(bind)
        except (ValueError, OSError) as exc:
            server.log.error("PIXSTREAM_METRICS_BIND: %s", exc)
            raise SystemExit(1) from exc
        server.log.info("serving /metrics on %s", bind)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """On SIGTERM, answer waiting long polls at once (204 + Pull-Next), then drain."""
    import gevent

    from pixstream.runtime import EXTENSION

    runtime = worker.wsgi.extensions[EXTENSION]
    runtime.start()  # listen before the first request arrives
    stop_accepting = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        stop_accepting(signum, frame)
        gevent.spawn(runtime.begin_shutdown)

    signal.signal(signal.SIGTERM, on_sigterm)


def worker_exit(server, worker):
    """Close the pool cleanly once the worker has drained."""
    from pixstream.runtime import EXTENSION

    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions[EXTENSION].stop()


def _write_problem(sock, status_int, reason, mesg):
    """gunicorn's own errors (414, 431, malformed requests) as problem+json too.

    gunicorn answers requests it cannot parse before the app sees them, with
    an HTML page; every 4xx/5xx of this service is RFC 9457 instead.
    """
    body = json.dumps(
        {"type": "about:blank", "title": reason, "status": status_int, "detail": mesg or reason}
    ).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = _write_problem
