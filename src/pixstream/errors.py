"""Domain errors; the HTTP edge maps each to an RFC 9457 problem document."""

from __future__ import annotations


class PixstreamError(Exception):
    """Base of every error pixstream raises on purpose."""

    status = 500
    title = "Internal error"
    retry_after: int | None = None
    # When set, the problem body says this instead of the message, which then goes
    # only to the log (with the request id): for causes that name hosts or users.
    public_detail: str | None = None


class ConfigError(PixstreamError):
    """A setting is invalid; the service refuses to start."""


class InvalidRequest(PixstreamError):
    """The request names an ISPB, count or value that cannot be valid."""

    status = 400
    title = "Invalid request"


class NotAcceptable(PixstreamError):
    """The client accepts none of the representations a stream can produce."""

    status = 406
    title = "Not acceptable"


class StreamNotFound(PixstreamError):
    """No stream of this ISPB ever had this id."""

    status = 404
    title = "Stream not found"


class StreamGone(PixstreamError):
    """The stream was closed, expired, or this id was superseded."""

    status = 410
    title = "Stream gone"


class TooManyStreams(PixstreamError):
    """The ISPB already has its maximum number of open streams."""

    status = 429
    title = "Too many streams"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DatabaseUnavailable(PixstreamError):
    """PostgreSQL cannot be reached right now; the client should retry shortly."""

    status = 503
    title = "Service unavailable"
    retry_after = 2
    public_detail = "database unavailable; retry after Retry-After"


class Unauthorized(PixstreamError):
    """No usable credential: missing, malformed, unknown, revoked or expired.

    ``www_authenticate`` is the challenge the answer carries (RFC 6750 for
    bearer tokens), or None when no scheme fits (mTLS).
    """

    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str, www_authenticate: str | None = None) -> None:
        super().__init__(detail)
        self.www_authenticate = www_authenticate


class Forbidden(PixstreamError):
    """A valid credential that may not do this: another ISPB's, or not an admin's."""

    status = 403
    title = "Forbidden"


class Conflict(PixstreamError):
    """A flood: more requests outstanding on one stream id than a retrying client makes."""

    status = 409
    title = "Too many requests on this id"


class IdempotencyKeyUsed(PixstreamError):
    """A start's Idempotency-Key names a stream that already went past its first answer.

    Its first answer can no longer be repeated, and opening another stream
    with the key would leave two open streams behind one key.
    """

    status = 409
    title = "Idempotency key already used"


class RateLimited(PixstreamError):
    """The ISPB sent requests faster than its rate allows."""

    status = 429
    title = "Rate limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Overloaded(PixstreamError):
    """The server or the stream is too busy right now; repeat the request after Retry-After."""

    status = 503
    title = "Server busy"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
