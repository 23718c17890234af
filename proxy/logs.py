"""Logging for `cachecade serve`: one JSON object per line (or plain text), each line inside a request carrying its
request id."""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

# Set by RequestIdMiddleware for the duration of a request; tasks a request starts inherit it.
current_request_id: ContextVar[str | None] = ContextVar("cachecade_request_id", default=None)

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# LogRecord attributes that are not fields passed with extra= (request_id: set by TextFormatter; color_message:
# uvicorn's message with terminal colours)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None)))
_STANDARD |= {"message", "asctime", "taskName", "request_id", "color_message"}


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _access_fields(record: logging.LogRecord) -> dict[str, Any]:
    """uvicorn's access line as fields: its arguments are (client, method, path, http version, status)."""
    args = record.args
    if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
        return {}
    client, method, path, _, status = args
    return {"client": client, "method": method, "path": path, "status": status}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO-8601 UTC), level, logger, message, request_id inside a request, fields
    passed with `extra=`, and exc_info / stack_info as strings."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id:
            out["request_id"] = request_id
        out.update(_access_fields(record))
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For people: time, level, logger, [request id], message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = current_request_id.get() or "-"
        return super().format(record)


def configure_logging(level: str, fmt: Literal["json", "text"], stream: TextIO | None = None) -> logging.Handler:
    """Send every log (uvicorn's, its access log included) to one handler on the root logger (stderr by default).
    uvicorn must then be run with log_config=None, so that it installs no handlers of its own."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    return handler


class Throttle:
    """At most one line per `every_s` for a failure that repeats with every request (a full disk fails every
    write): the first at once, each later one with the count of those left out since."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._left_out = 0

    def warning(self, logger: logging.Logger, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it in the last {now - self._last:.0f} s, not logged)"
        self._last, self._left_out = now, 0
        logger.warning(message, *args)
