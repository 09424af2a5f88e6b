"""Access control at the HTTP edge: who is calling, and may they touch this ISPB?

``PIXSTREAM_AUTH`` chooses how a caller proves who it is: ``none`` (no check:
a laptop, the Quick start), ``token`` (``Authorization: Bearer``, RFC 6750) or
``mtls`` (a client certificate verified by a TLS proxy and forwarded in a
header). The access service (:mod:`pixstream.access`) maps the credential to a
principal; this module only reads headers and compares the principal's ISPB
with the URL's, before the view runs: a foreign credential never reaches the
database, so it cannot learn whether a stream id exists. See docs/security.md.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from flask import Flask, current_app, g, request

from pixstream.errors import Forbidden, Unauthorized
from pixstream.runtime import runtime
from pixstream.validation import parse_ispb

if TYPE_CHECKING:
    from pixstream.access import Principal

log = logging.getLogger(__name__)

EXTENSION = "pixstream.auth"
REALM = "pixstream"
BEARER_CHALLENGE = f'Bearer realm="{REALM}"'
# mTLS has no registered HTTP authentication scheme, yet a 401 must carry a
# challenge (RFC 9110, 11.6.1). An unregistered scheme that names what is
# needed invites no client to answer with a header (as Bearer would).
CERTIFICATE_CHALLENGE = f'ClientCertificate realm="{REALM}"'
METRICS_CHALLENGE = f'Bearer realm="{REALM}-metrics"'

# RFC 6750, 2.1: credentials = "Bearer" 1*SP b64token.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)
_REJECTED = {
    "unknown": "the token is unknown",
    "revoked": "the token was revoked",
    "expired": "the token has expired",
}
_CERT_REJECTED = {
    "unknown": "the client certificate is not registered",
    "revoked": "the client certificate was revoked",
    "expired": "the client certificate has expired",
    "malformed": "the forwarded client certificate cannot be parsed",
}
# Envoy's X-Forwarded-Client-Cert: entries separated by commas, key=value
# pairs by semicolons, values optionally double-quoted.
_XFCC_PAIR = re.compile(r'\s*([A-Za-z]+)=("(?:[^"\\]|\\.)*"|[^;,]*)\s*([;,]|$)')

_XFCC_START = re.compile(r"\s*(By|Hash|Cert|Chain|Subject|URI|DNS)=", re.IGNORECASE)

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)

_open_warning_logged = False


@dataclass(frozen=True)
class AuthSettings:
    """What one app checks, read once from its config."""

    mode: str
    header: str
    proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def trusted(self, address: str | None) -> bool:
        """Whether ``address`` is one of the configured TLS proxies."""
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)


def settings() -> AuthSettings:
    """The current app's access-control settings."""
    return current_app.extensions[EXTENSION]  # type: ignore[no-any-return]


def mode() -> str:
    """The current app's auth mode: none, token or mtls."""
    return settings().mode


# -- header parsing (pure functions, tested on their own) ---------------------


def bearer_token(header: str | None) -> str:
    """The token of an ``Authorization: Bearer`` header; Unauthorized (401) otherwise."""
    if header is None or not header.strip():
        raise Unauthorized(
            "this route needs a bearer token: send Authorization: Bearer <token>",
            BEARER_CHALLENGE,
        )
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        # Say what is wrong without echoing the header: it may hold a secret.
        raise Unauthorized(
            "the Authorization header is not of the form Bearer <token>",
            f'{BEARER_CHALLENGE}, error="invalid_request", '
            'error_description="malformed Authorization header"',
        )
    return match[1]


def forwarded_certificate(value: str) -> bytes:
    """The PEM certificate in a proxy's header, from either format a proxy sends.

    - nginx ``$ssl_client_escaped_cert`` (and AWS ALB, Traefik's PEM option):
      the PEM, URL-escaped. The deprecated ``$ssl_client_cert`` (a folded
      header, whose newlines arrive as spaces) is accepted too.
    - Envoy ``X-Forwarded-Client-Cert``: ``By=...;Hash=...;Cert="<URL-escaped
      PEM>"``; the first entry is the one the edge proxy added for the client.

    Raises Unauthorized when no certificate can be found in it.
    """
    text = value.strip()
    if _XFCC_START.match(text):
        cert = _xfcc_cert(text)
        if cert is None:
            raise Unauthorized(
                "the proxy forwarded no client certificate (Envoy: enable "
                "forward_client_cert_details with set_current_client_cert_details.cert)",
                CERTIFICATE_CHALLENGE,
            )
        text = cert
    match = _PEM.search(unquote(text))
    if match is None:
        raise Unauthorized(
            "the forwarded client certificate is not a PEM certificate", CERTIFICATE_CHALLENGE
        )
    # Re-wrapped from its base64 alone: a header may have turned its newlines
    # into spaces or tabs (nginx's old $ssl_client_cert, unfolded by the server).
    body = re.sub(r"\s+", "", match[1])
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        ["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----", ""]
    ).encode("ascii", "replace")


def _xfcc_cert(value: str) -> str | None:
    """The ``Cert`` element of the first entry of an X-Forwarded-Client-Cert value."""
    position = 0
    while position < len(value):
        match = _XFCC_PAIR.match(value, position)
        if match is None or match.end() == position:
            return None
        key, raw, separator = match[1], match[2], match[3]
        if key.lower() == "cert":
            return raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
        if separator != ";":
            return None  # end of the first entry
        position = match.end()
    return None


def metrics_token_ok(configured: str, header: str | None) -> bool:
    """Whether ``header`` is ``Bearer <configured>``, compared in constant time."""
    match = _BEARER.fullmatch((header or "").strip())
    given = match[1] if match else ""
    return hmac.compare_digest(given.encode(), configured.encode())


# -- the request hook ---------------------------------------------------------


def _authorize(principal: Principal, ispb: str, admin_route: bool) -> None:
    """403 unless ``principal`` may call this route for ``ispb``.

    Admin credentials manage and load test data; they do not read payments:
    an admin token on /api/pix/... is 403, so that leaking one cannot drain a
    bank's queue. Bank credentials read their own ISPB only.
    """
    if admin_route:
        if not principal.admin:
            raise Forbidden("only an admin credential may call the util routes")
        return
    if principal.admin:
        raise Forbidden("an admin credential manages the service; it cannot read any ISPB")
    if principal.ispb != ispb:
        raise Forbidden("this credential belongs to another ISPB")


def _authenticate_token() -> Principal:
    from pixstream.access import CredentialRejected

    token = bearer_token(request.headers.get("Authorization"))
    try:
        return runtime().access.authenticate_token(token)
    except CredentialRejected as rejected:
        description = _REJECTED.get(rejected.reason, "the token is not valid")
        raise Unauthorized(
            description,
            f'{BEARER_CHALLENGE}, error="invalid_token", error_description="{description}"',
        ) from None


def _authenticate_certificate(config: AuthSettings) -> Principal:
    from pixstream.access import CredentialRejected

    if not config.trusted(request.remote_addr):
        raise Forbidden("in mtls mode this service answers only its TLS proxy; connect through it")
    value = request.headers.get(config.header)
    if value is None or not value.strip():
        raise Unauthorized(
            "no client certificate: connect through the TLS proxy with your certificate",
            CERTIFICATE_CHALLENGE,
        )
    pem = forwarded_certificate(value)
    try:
        return runtime().access.authenticate_certificate(pem)
    except CredentialRejected as rejected:  # BadCertificate too: reason "malformed"
        raise Unauthorized(
            _CERT_REJECTED.get(rejected.reason, "the client certificate is not valid"),
            CERTIFICATE_CHALLENGE,
        ) from None


def _check() -> None:
    """Before every request: authenticate and authorize the routes under /api/."""
    config = settings()
    if config.mode == "none" or request.url_rule is None:
        return  # unknown paths and wrong methods answer 404/405 as before: no data there
    blueprint = request.blueprint
    if blueprint not in ("streams", "util"):
        return
    # A path that cannot be valid is a 400 for everyone, as without auth: the
    # rule is public, and a 403 would wrongly suggest the ISPB exists elsewhere.
    ispb = parse_ispb((request.view_args or {}).get("ispb", ""))
    if config.mode == "token":
        principal = _authenticate_token()
    else:
        principal = _authenticate_certificate(config)
    g.principal = principal
    _authorize(principal, ispb, admin_route=blueprint == "util")


def _warn_open_once() -> None:
    """One warning per process: with auth off, anyone who can connect reads any ISPB."""
    global _open_warning_logged
    if _open_warning_logged:
        return
    _open_warning_logged = True
    log.warning(
        "PIXSTREAM_AUTH=none: no credential is checked; anyone who can reach this service "
        "can read and confirm every institution's payments. Set PIXSTREAM_AUTH=token or "
        "mtls outside a laptop (docs/security.md)"
    )


def init_app(app: Flask) -> None:
    """Read the auth settings and install the check before every request."""
    config = AuthSettings(
        mode=app.config["AUTH"],
        header=app.config["MTLS_HEADER"],
        proxies=tuple(ipaddress.ip_network(n) for n in app.config["TRUSTED_PROXIES"]),
    )
    app.extensions[EXTENSION] = config
    if config.mode == "none":
        _warn_open_once()
    app.before_request(_check)
