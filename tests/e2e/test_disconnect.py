"""A client that goes away cancels the upstream request: real servers (uvicorn in threads, real sockets)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from proxy.app import create_app
from proxy.config import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.e2e


class SlowUpstream:
    """An OpenAI-compatible stand-in that answers slowly and records when its caller hung up."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        if body.get("stream"):
            return StreamingResponse(self.events(), media_type="text/event-stream")
        for _ in range(100):  # up to 10 s, unless the caller goes away
            if await request.is_disconnected():
                self.cancelled.set()
                return JSONResponse({})
            await asyncio.sleep(0.1)
        return JSONResponse({"choices": []})

    async def events(self) -> AsyncIterator[bytes]:
        try:
            for i in range(100):
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"{i} "}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def serve(app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def upstream() -> Iterator[tuple[SlowUpstream, str]]:
    slow = SlowUpstream()
    for url in serve(slow.app):
        yield slow, url


@pytest.fixture
def proxy_url(upstream: tuple[SlowUpstream, str], embedder: object, tmp_path: Path) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", upstream_base_url=f"{upstream[1]}/v1")
    yield from serve(create_app(settings, embedder=embedder))  # type: ignore[arg-type]


def request(stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "count slowly"}], "stream": stream}


def test_stream_disconnect_cancels_upstream(upstream: tuple[SlowUpstream, str], proxy_url: str) -> None:
    with (
        httpx.Client(base_url=proxy_url) as client,
        client.stream("POST", "/v1/chat/completions", json=request(True)) as response,
    ):
        assert response.headers["x-cache"] == "MISS"
        for i, _ in enumerate(response.iter_lines()):
            if i >= 3:
                break
    assert upstream[0].cancelled.wait(5), "upstream stream still running after the client left"


def test_non_stream_disconnect_cancels_upstream(upstream: tuple[SlowUpstream, str], proxy_url: str) -> None:
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=proxy_url, timeout=0.5) as client:
        client.post("/v1/chat/completions", json=request(False))
    assert upstream[0].cancelled.wait(5), "upstream request still running after the client left"


def test_a_responses_stream_disconnect_cancels_upstream(upstream: tuple[SlowUpstream, str], proxy_url: str) -> None:
    """The same for /v1/responses: the bridge closes the chat stream it reads when its own client leaves."""
    body = {"model": "m", "input": "count slowly", "stream": True}
    with (
        httpx.Client(base_url=proxy_url) as client,
        client.stream("POST", "/v1/responses", json=body) as response,
    ):
        assert response.headers["x-cache"] == "MISS"
        for i, _ in enumerate(response.iter_lines()):
            if i >= 12:  # past response.created / in_progress and into the text deltas
                break
    assert upstream[0].cancelled.wait(5), "upstream stream still running after the client left"
