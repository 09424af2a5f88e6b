"""Domain errors; the HTTP edge maps each to an RFC 9457 problem document."""

from __future__ import annotations


class PixstreamError(Exception):
    """Base of every error pixstream raises on purpose."""

    status = 500
    title = "Internal error"
    retry_after: int | None = None


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
