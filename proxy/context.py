"""Per-request context: request id, tenant and the caller's cache directives."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import InvalidRequest
from proxy.logs import current_request_id

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_WHOLE = re.compile(r"^[0-9]{1,12}$")
ANONYMOUS = "anonymous"
SHARED = "shared"


def key_id(api_key: str) -> str:
    """The id of an API key: a hash (the key itself is never stored). Budgets are configured by this id."""
    return "k-" + hashlib.sha256(b"cachecade-tenant:" + api_key.encode()).hexdigest()[:24]


def key_id_of(headers: Mapping[str, str]) -> str:
    """The id of the caller's API key (Authorization: Bearer, or api-key), or 'anonymous'."""
    auth = headers.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("api-key", "").strip()
    return key_id(key) if key else ANONYMOUS


def token_budget_of(headers: Mapping[str, str]) -> int | None:
    """The per-request budget from the x-token-budget header: a positive whole number of tokens."""
    raw = headers.get("x-token-budget")
    if raw is None:
        return None
    value = raw.strip()
    if not _WHOLE.match(value) or int(value) < 1:
        raise InvalidRequest(
            f"x-token-budget must be a positive whole number of tokens, got {raw!r}",
            param="x-token-budget",
            code="invalid_header",
        )
    return int(value)


@dataclass(frozen=True)
class CacheDirectives:
    """The caller's Cache-Control: no-cache (skip the lookup), no-store (do not store), max-age (seconds)."""

    no_cache: bool = False
    no_store: bool = False
    max_age: float | None = None

    @classmethod
    def parse(cls, header: str | None) -> CacheDirectives:
        if not header:
            return cls()
        no_cache = no_store = False
        max_age = None
        for part in header.split(","):
            name, _, value = part.strip().partition("=")
            name = name.strip().lower()
            if name == "no-cache":
                no_cache = True
            elif name == "no-store":
                no_store = True
            elif name == "max-age":
                try:
                    max_age = float(int(value.strip().strip('"')))
                except ValueError:
                    raise InvalidRequest(
                        f"Cache-Control max-age must be a whole number of seconds, got {value!r}",
                        param="Cache-Control",
                        code="invalid_header",
                    ) from None
                if max_age < 0:
                    raise InvalidRequest("Cache-Control max-age must not be negative", param="Cache-Control")
        return cls(no_cache, no_store, max_age)


@dataclass
class RequestContext:
    """What the pipeline needs to know about the caller."""

    request_id: str
    tenant: str
    headers: Mapping[str, str]
    key_id: str = ANONYMOUS  # whose budget the request counts against
    token_budget: int | None = None  # the x-token-budget header
    directives: CacheDirectives = field(default_factory=CacheDirectives)
    # Returns once the caller has disconnected; the pipeline cancels upstream work when it does.
    disconnected: Callable[[], Awaitable[None]] | None = None


def request_id_of(scope: Scope) -> str:
    """The request id set by RequestIdMiddleware."""
    return str(scope.get("state", {}).get("request_id", ""))


class RequestIdMiddleware:
    """Gives every request an id (the caller's x-request-id when well formed) and echoes it in the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        token = current_request_id.set(request_id)  # for the log lines the request writes
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current_request_id.reset(token)
