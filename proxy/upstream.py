"""The upstream client: one shared httpx.AsyncClient to an OpenAI-compatible backend.

httpx exceptions are translated here, at the boundary, into the proxy's errors.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from proxy.errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable

# Client headers worth passing on; everything else (host, cookies, our own cache headers) stays here.
_PASSED_HEADERS = ("openai-organization", "openai-project", "x-request-id")


def _payload(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return {"error": {"message": response.text[:500] or f"HTTP {response.status_code}"}}


class Upstream:
    """Forwards requests to one OpenAI-compatible base URL (…/v1)."""

    def __init__(self, base_url: str, api_key: str | None, client: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.client = client
        self._speaks_responses: bool | None = None

    @classmethod
    def create(
        cls,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 5.0,
        max_connections: int = 100,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Upstream:
        """Build the shared client with pooling and timeouts (a transport seam for tests)."""
        # Waiting for a free pooled connection is waiting for the upstream: it gets the read timeout, so a burst
        # past max_connections queues instead of failing after the connect timeout.
        timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s, pool=timeout_s)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport)
        return cls(base_url, api_key, client)

    async def speaks_responses(self, headers: Mapping[str, str]) -> bool:
        """Whether the upstream has a Responses API, asked once (an empty POST /responses: a 404 or 405 means no;
        a 400 for the missing fields means yes) and remembered; unreachable means no, asked again next time."""
        if self._speaks_responses is None:
            try:
                response = await self.client.post(self._url("responses"), content=b"{}",
                                                  headers=_json_headers(headers))  # fmt: skip
            except httpx.HTTPError:
                return False
            self._speaks_responses = response.status_code not in (404, 405, 501)
        return self._speaks_responses

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """Headers for the upstream: the configured key, else the caller's own Authorization."""
        out = {k: incoming[k] for k in _PASSED_HEADERS if k in incoming}
        if self.api_key:
            out["authorization"] = f"Bearer {self.api_key}"
        elif "authorization" in incoming:
            out["authorization"] = incoming["authorization"]
        return out

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    async def post(self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
        """POST JSON and return the JSON answer; an upstream error keeps its status."""
        try:
            response = await self.client.post(self._url(path), content=_json(body), headers=_json_headers(headers))
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise UpstreamError(response.status_code, _payload(response))
        try:
            payload = response.json() if response.status_code < 300 else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise UpstreamUnavailable(f"upstream answered HTTP {response.status_code} without a JSON object")
        return payload

    async def get(self, path: str, headers: Mapping[str, str]) -> dict[str, Any]:
        """GET JSON (e.g. /models)."""
        try:
            response = await self.client.get(self._url(path), headers=_raw(headers))
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise UpstreamError(response.status_code, _payload(response))
        payload = _payload(response)
        return payload if isinstance(payload, dict) else {}

    @asynccontextmanager
    async def stream(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a streamed POST. Errors before the first byte raise (status kept); closing the context closes
        the upstream connection, which is how a client disconnect cancels the upstream request."""
        request = self.client.build_request(
            "POST", self._url(path), content=_json(body), headers=_json_headers(headers)
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"upstream unreachable: {type(exc).__name__}") from exc
        try:
            if response.status_code >= 400:
                try:
                    await response.aread()
                except httpx.HTTPError as exc:
                    raise UpstreamUnavailable(f"upstream broke while sending HTTP {response.status_code}") from exc
                raise UpstreamError(response.status_code, _payload(response))
            yield _body(response)
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _body(response: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout("upstream stream timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(f"upstream stream broke: {type(exc).__name__}") from exc


def _json(body: Mapping[str, Any]) -> bytes:
    """ASCII JSON: a lone surrogate a client sent stays an escape instead of failing to encode as UTF-8."""
    return json.dumps(body, separators=(",", ":"), allow_nan=True).encode()


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as the client sent them: the server decoded their bytes as Latin-1, and httpx encodes str values as
    ASCII, so a non-ASCII value (UTF-8 in an x-request-id) goes back to its bytes instead of failing the request."""
    return [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace")) for k, v in headers.items()]


def _json_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [
        *_raw({k: v for k, v in headers.items() if k.lower() != "content-type"}),
        (b"content-type", b"application/json"),
    ]
