"""One JSON object per log line, carrying the request id of the call being served.

The request id lives in a context variable: a gRPC handler or the receiver's worker sets it with
`request_context` for the duration of one call or job, and every line logged meanwhile (in that
thread) carries it without passing it around. Extra fields given as `logger.info(msg, extra={...})`
are added to the object as they are.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
MAX_REQUEST_ID_CHARS = 64

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Format a record as a single-line JSON object: ts, level, service, logger, msg, request_id."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger (uvicorn's too) to stderr as JSON lines at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def clean_request_id(value: str | None) -> str | None:
    """A request id safe to log and forward as gRPC metadata: printable ASCII, at most
    MAX_REQUEST_ID_CHARS characters, or None."""
    if not value:
        return None
    cleaned = "".join(ch for ch in value[:MAX_REQUEST_ID_CHARS] if ch.isascii() and ch.isprintable())
    return cleaned or None


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Tag every line logged inside the block (in this thread or task) with `request_id`."""
    token = REQUEST_ID.set(clean_request_id(request_id))
    try:
        yield
    finally:
        REQUEST_ID.reset(token)
