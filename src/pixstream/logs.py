"""Log set-up: plain lines by default, JSON lines with PIXSTREAM_LOG_FORMAT=json.

Every record made while serving a request carries its X-Request-ID.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from flask import g, has_request_context

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# Attributes every LogRecord has; anything else was passed with extra=.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = g.get("request_id") if has_request_context() else None
            record.request_id = request_id or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(log_format: str, level: str) -> None:
    """Install one handler on the pixstream logger (idempotent across app instances)."""
    logger = logging.getLogger("pixstream")
    logger.setLevel(level)
    for handler in logger.handlers:
        if getattr(handler, "pixstream", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.pixstream = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
