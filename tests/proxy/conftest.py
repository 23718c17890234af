"""In-process API tests: the real app over ASGI, a real embedder and store, and an httpx.MockTransport upstream."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Settings

ADMIN = "admin-token-0123456789"


def chat_response(content: str, finish: str = "stop", model: str = "up-model") -> dict[str, Any]:
    return {
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }  # fmt: skip


def words(text: str) -> list[str]:
    """Pieces whose concatenation is the text."""
    parts = text.split(" ")
    return [p + " " for p in parts[:-1]] + parts[-1:]


def sse_body(words: list[str], finish: str = "stop", done: bool = True) -> bytes:
    head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "up-model"}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words]
    events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


class FakeUpstream:
    """Records requests; answers by a handler (default: a fixed answer, streamed when asked)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.answer = "Paris is the capital of France."
        self.handler: Callable[[httpx.Request], httpx.Response] | None = None

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.content]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.handler is not None:
            return self.handler(request)
        if "/responses" in request.url.path:  # a server that speaks chat completions only
            return httpx.Response(404, json={"error": {"message": "Not Found"}})
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "up-model", "object": "model"}]})
        body = json.loads(request.content)
        if body.get("stream"):
            return httpx.Response(200, content=sse_body(words(self.answer)),
                                  headers={"content-type": "text/event-stream"})  # fmt: skip
        if request.url.path.endswith("/completions") and "prompt" in body:
            return httpx.Response(200, json={"id": "cmpl-up", "object": "text_completion", "created": 1,
                                             "model": "up-model", "choices": [{"index": 0, "text": self.answer,
                                             "finish_reason": "stop", "logprobs": None}],
                                             "usage": {"prompt_tokens": 3, "completion_tokens": 5,
                                                       "total_tokens": 8}})  # fmt: skip
        return httpx.Response(200, json=chat_response(self.answer))


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture(scope="session")
def pair_verifier(model_cache: Path):  # type: ignore[no-untyped-def]
    """The shipped cache verifier, exported to ONNX once per session."""
    from cache.verifier import PairVerifier

    return PairVerifier.load(None, model_cache)


@pytest.fixture
def make_client(tmp_path: Path, embedder: Any, engines: Any, upstream: FakeUpstream,  # type: ignore[no-untyped-def]
                request: pytest.FixtureRequest):  # fmt: skip
    """Factory: an httpx client on the app (lifespan run), with settings overrides. The cache verifier is off
    unless `cache_verifier` is given (tests of the cosine tier keep their thresholds; tests/proxy/
    test_verifier_api.py tests the verified tier)."""

    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "upstream_base_url": "http://upstream.test/v1",
                                  "admin_token": ADMIN, "cache_verifier": "off", **overrides}  # fmt: skip
        transport = None if values["upstream_base_url"] is None else httpx.MockTransport(upstream)
        verifier = None if values["cache_verifier"] == "off" else request.getfixturevalue("pair_verifier")
        app = create_app(Settings(**values), embedder=embedder, upstream_transport=transport, engines=engines,
                         verifier=verifier)  # fmt: skip
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cachecade.test") as client:
                yield client

    return factory


@pytest.fixture
async def client(make_client):  # type: ignore[no-untyped-def]
    async with make_client() as c:
        yield c


def chat(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "up-model", "messages": [{"role": "user", "content": question}], **extra}


@pytest.fixture
def make_replica(make_client, tmp_path: Path, redis_url: str):  # type: ignore[no-untyped-def]
    """Factory: make_client for a replica of its own data dir on the session's Redis, under this test's prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # this test's own keys on the session's server

    def factory(name: str, **overrides: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return make_client(**{"data_dir": tmp_path / name, "redis_url": redis_url, "redis_prefix": prefix,
                              "cascade_routes": {}, **overrides})  # fmt: skip

    return factory
