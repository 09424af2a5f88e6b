"""``/metrics`` on a separate address (PIXSTREAM_METRICS_BIND), served by gunicorn's master.

An operator who cannot put a token in the scraper, or would rather not expose
metrics on the port the banks reach, binds them to an internal address
instead (``127.0.0.1:9100``, or a private interface); the public port then
answers 404 for ``/metrics``. The master process serves it, so that it keeps
answering while workers restart, and it reads the workers' shared metric
files like any worker would.

Standard library and prometheus_client only: the master must not import
psycopg or gevent before it forks (see gunicorn.conf.py), nor register
metrics of its own (the workers' files are the whole truth).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

ENV = "PIXSTREAM_METRICS_BIND"

Environ = dict[str, object]
StartResponse = Callable[..., object]


def parse_bind(value: str) -> tuple[str, int]:
    """``host:port`` (an IP address, IPv6 in brackets) as (host, port); ValueError if not."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ENV} must be host:port, e.g. 127.0.0.1:9100, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{ENV} must name an IP address, e.g. 127.0.0.1:9100, got {value!r}"
        ) from None
    return host, int(port)


def _exposition() -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    mode = os.environ.get("PIXSTREAM_AUTH", "none")
    return (
        generate_latest(registry)
        + (
            "# HELP pixstream_auth_mode The access-control mode in force (PIXSTREAM_AUTH).\n"
            "# TYPE pixstream_auth_mode gauge\n"
            f'pixstream_auth_mode{{mode="{mode}"}} 1.0\n'
        ).encode()
    )


def _problem(start_response: StartResponse, status: str, detail: str) -> Iterable[bytes]:
    code, _, title = status.partition(" ")
    body = (
        f'{{"type":"about:blank","title":"{title}","status":{code},"detail":"{detail}"}}'
    ).encode()
    headers = [("Content-Type", "application/problem+json"), ("Content-Length", str(len(body)))]
    if code == "401":
        headers.append(("WWW-Authenticate", 'Bearer realm="pixstream-metrics"'))
    start_response(status, headers)
    return [body]


def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """GET /metrics, with PIXSTREAM_METRICS_TOKEN checked as on the public port."""
    if environ.get("PATH_INFO") != "/metrics":
        return _problem(start_response, "404 Not Found", "only /metrics is served here")
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        return _problem(start_response, "405 Method Not Allowed", "GET /metrics")
    token = os.environ.get("PIXSTREAM_METRICS_TOKEN") or None
    sent = str(environ.get("HTTP_AUTHORIZATION", ""))
    if token is not None and not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return _problem(
            start_response,
            "401 Unauthorized",
            "/metrics needs Authorization: Bearer <PIXSTREAM_METRICS_TOKEN>",
        )
    body = _exposition()
    start_response(
        "200 OK",
        [("Content-Type", "text/plain; version=0.0.4; charset=utf-8"),
         ("Content-Length", str(len(body)))],
    )  # fmt: skip
    return [body]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would drown the access log; gunicorn logs the rest."""


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadedServerV6(_ThreadedServer):
    address_family = socket.AF_INET6


def serve(bind: str) -> WSGIServer:
    """Serve /metrics on ``bind`` from a daemon thread; the server, to close it."""
    host, port = parse_bind(bind)
    server_class = _ThreadedServerV6 if ":" in host else _ThreadedServer
    server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-bind", daemon=True).start()
    return server
