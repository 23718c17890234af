"""The proxy's error hierarchy and its one mapping to HTTP: OpenAI's error shape, as JSON or as an SSE event."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cache.errors import CacheError

log = logging.getLogger("cachecade.errors")


class ProxyError(Exception):
    """Base of every error the proxy answers with. Carries OpenAI's error fields."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ProxyError):
    """The client sent something we cannot accept (400)."""

    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    """A request body over the configured limit (413), refused while it is read, before it is parsed."""

    status = 413
    code = "request_too_large"


class RequestTimeout(InvalidRequest):
    """A request body that did not arrive in time (408): a stalled or trickling client."""

    status = 408
    code = "request_timeout"


class Unauthorized(ProxyError):
    """Missing or wrong credentials (401)."""

    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    """No such route, model or entry (404)."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(ProxyError):
    """The request conflicts with what was done before, e.g. a second feedback on one answer (409)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class ServiceUnavailable(ProxyError):
    """We cannot serve this now (503), e.g. no upstream configured or not ready."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamUnavailable(ProxyError):
    """The upstream could not be reached or broke the connection (502)."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamUnavailable):
    """The upstream did not answer in time (504)."""

    status = 504
    code = "upstream_timeout"


class UpstreamError(ProxyError):
    """The upstream answered with an error: its status is kept, and its error object when it sent one."""

    type = "upstream_error"

    def __init__(self, status: int, payload: Any) -> None:
        error = payload.get("error") if isinstance(payload, Mapping) else None
        message = error.get("message") if isinstance(error, Mapping) else None
        super().__init__(str(message or f"upstream answered HTTP {status}"), status=status)
        self.upstream_error = dict(error) if isinstance(error, Mapping) else None

    def body(self) -> dict[str, Any]:
        if self.upstream_error is not None:
            return {"error": {"message": self.message, "type": self.type, "param": None, "code": None,
                              **self.upstream_error}}  # fmt: skip
        return super().body()


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal"}


def _is_type_tag(part: object) -> bool:
    """Union branches appear in pydantic locations as type tags ('str', 'list[str]'); they are not parameters."""
    if not isinstance(part, str):
        return False
    return "[" in part or part in _TYPE_TAGS or part.startswith(("constrained-", "function-", "json-or-python"))


def param_of(error: Mapping[str, Any]) -> str | None:
    """A dotted parameter name from a pydantic error location ('messages.0.role')."""
    loc: list[str] = []
    for part in error.get("loc", ()):
        if _is_type_tag(part):
            break
        if part not in ("body", "query", "header", "path"):
            loc.append(str(part))
    return ".".join(loc) or None


def from_validation(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """The first parameter with a problem, named; for a union, what each accepted form needed."""
    errors = exc.errors()
    param = param_of(errors[0]) if errors else None
    same = [e for e in errors if param_of(e) == param]
    details = list(dict.fromkeys(str(e.get("msg", "invalid value")) for e in same))
    detail = " or ".join(details) if details else "invalid value"
    message = f"Invalid value for '{param}': {detail}" if param else detail
    others = len({param_of(e) for e in errors}) - 1
    if others > 0:
        message += f" (and {others} more parameter{'s' if others > 1 else ''} with problems)"
    return InvalidRequest(message, param=param, code="invalid_value")


def to_proxy_error(exc: BaseException) -> ProxyError:
    """Translate any exception to the error we answer with; unknown ones become a generic 500."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return from_validation(exc)
    if isinstance(exc, CacheError):
        return ServiceUnavailable(f"cache unavailable: {exc}")
    if isinstance(exc, StarletteHTTPException):
        cls = NotFound if exc.status_code == 404 else InvalidRequest
        return cls(str(exc.detail), status=exc.status_code)
    log.exception("unhandled error", exc_info=exc)
    return ProxyError("internal error; see the proxy's log", code="internal_error")


def error_response(exc: BaseException, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The JSON response for an error."""
    err = to_proxy_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **(headers or {})})


def sse_error_event(exc: BaseException) -> bytes:
    """The error as an SSE event, for a stream that has already started."""
    return f"data: {json.dumps(to_proxy_error(exc).body())}\n\n".encode()


def install_error_handlers(app: FastAPI) -> None:
    """Map every error raised by a route to OpenAI's error shape; never a stack trace to the client."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", None)
        return error_response(exc, {"x-request-id": request_id} if request_id else None)

    for exc_type in (ProxyError, RequestValidationError, CacheError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
