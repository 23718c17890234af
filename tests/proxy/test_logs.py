"""`cachecade serve`'s operations: JSON log lines that carry the request id, uvicorn's logs (access log included)
through the same formatter, and a graceful shutdown that lets a stream in flight finish."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from proxy.app import create_app
from proxy.cli import main
from proxy.config import Settings
from proxy.logs import UVICORN_LOGGERS, JsonFormatter, configure_logging, current_request_id
from tests.conftest import free_port
from tests.proxy.conftest import ADMIN, sse_body, words


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """configure_logging("info", "json") into a buffer; the loggers it changed are put back afterwards."""
    root, uvicorn_loggers = logging.getLogger(), [logging.getLogger(n) for n in UVICORN_LOGGERS]
    level, saved = root.level, [(lg.handlers[:], lg.propagate) for lg in uvicorn_loggers]
    out = io.StringIO()
    handler = configure_logging("info", "json", out)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)
    for logger, (handlers, propagate) in zip(uvicorn_loggers, saved, strict=True):
        logger.handlers, logger.propagate = handlers, propagate


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_time_level_logger_and_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("cachecade.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    record.tier = "smollm2"  # as logging does with extra={"tier": ...}
    token = current_request_id.set("req-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        current_request_id.reset(token)
    assert line["ts"].endswith("Z") and line["ts"][10] == "T"
    assert (line["level"], line["logger"], line["message"]) == ("ERROR", "cachecade.x", "failed here")
    assert line["request_id"] == "req-1" and line["tier"] == "smollm2"
    assert "ValueError: boom" in line["exc_info"]


async def test_a_line_logged_during_a_request_carries_its_request_id(make_client: Any, log_output: io.StringIO) -> None:
    async with make_client() as client:
        r = await client.put("/admin/config", json={"threshold": 0.97},
                             headers={"authorization": f"Bearer {ADMIN}", "x-request-id": "req-admin-7"})  # fmt: skip
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-admin-7"
    found = lines(log_output)
    changed = [line for line in found if line["message"].startswith("admin changed")]
    assert len(changed) == 1 and changed[0]["request_id"] == "req-admin-7"
    started = [line for line in found if line["message"].startswith("cache ready")]
    assert started and "request_id" not in started[0]  # logged outside any request
    assert current_request_id.get() is None  # the middleware put the context back


def test_serve_passes_logging_and_shutdown_settings_to_uvicorn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: dict[str, Any] = {}
    monkeypatch.setattr("proxy.logs.configure_logging", lambda level, fmt: calls.update(logging=(level, fmt)))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.update(uvicorn=kwargs))
    monkeypatch.setenv("CACHECADE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CACHECADE_LOG_FORMAT", "text")
    monkeypatch.setenv("CACHECADE_SHUTDOWN_GRACE_S", "7.5")
    assert main(["serve", "--port", "8123", "--log-level", "warning"]) == 0
    assert calls["logging"] == ("warning", "text")
    assert calls["uvicorn"]["log_config"] is None  # uvicorn's loggers go through ours
    assert calls["uvicorn"]["timeout_graceful_shutdown"] == 8 and calls["uvicorn"]["port"] == 8123


class SlowStream:
    """An upstream (httpx.MockTransport handler) that streams its answer one word every `pause` seconds."""

    def __init__(self, answer: str, pause: float) -> None:
        self.chunks = [line + b"\n\n" for line in sse_body(words(answer)).split(b"\n\n") if line]
        self.pause = pause

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=self.body(), headers={"content-type": "text/event-stream"})

    async def body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
            await asyncio.sleep(self.pause)


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.e2e
def test_shutdown_lets_a_stream_in_flight_finish(embedder: Any, tmp_path: Path) -> None:
    answer = "one two three four five six seven eight nine ten eleven twelve"
    settings = Settings(data_dir=tmp_path, upstream_base_url="http://upstream.test/v1", cascade_routes={})
    app = create_app(settings, embedder=embedder, upstream_transport=httpx.MockTransport(SlowStream(answer, 0.15)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=10))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    received, closed_mid_stream = [], False
    body = {"model": "up-model", "messages": [{"role": "user", "content": "Count"}], "stream": True}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client, client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"x-request-id": "req-stream-1"}
    ) as r:  # fmt: skip
        for line in r.iter_lines():
            received.append(line)
            if len(received) == 1:
                server.should_exit = True  # what SIGTERM does
            if not closed_mid_stream and "[DONE]" not in line:
                closed_mid_stream = refused(port)  # shutdown under way: no new connections
    thread.join(timeout=15)
    assert closed_mid_stream, "the server had not begun shutting down while the stream ran"
    assert not thread.is_alive()
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in received if line.startswith("data: {"))  # fmt: skip
    assert text == answer and [line for line in received if line][-1] == "data: [DONE]"
