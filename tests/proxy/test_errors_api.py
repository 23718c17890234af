"""Bad input gets a clear 400 naming the parameter; upstream failures keep OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.proxy.conftest import FakeUpstream, chat


def assert_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({**chat("hi"), "stream": "yes"}, "stream"),
        ({**chat("hi"), "temperature": "hot"}, "temperature"),
        ({**chat("hi"), "temperature": 3}, "temperature"),
        ({**chat("hi"), "max_tokens": 0}, "max_tokens"),
        ({**chat("hi"), "cache": {"ttl": -1}}, "cache.ttl"),
        ({**chat("hi"), "cache": {"namespace": "a b"}}, "cache.namespace"),
        ({**chat("hi"), "cache": {"bogus": 1}}, "cache.bogus"),
    ],
)
async def test_bad_fields_name_the_parameter(
    client: httpx.AsyncClient, upstream: FakeUpstream, body: dict, param: str
) -> None:
    error = assert_error(await client.post("/v1/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert upstream.requests == []


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"", b"null"])
async def test_unparseable_bodies(client: httpx.AsyncClient, raw: bytes) -> None:
    r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, None)


async def test_bad_input_corrupts_nothing(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("What is 2 + 2?"))
    await client.post("/v1/chat/completions", json={**chat("What is 2 + 2?"), "temperature": "hot"})
    assert (await client.post("/v1/chat/completions", json=chat("What is 2 + 2?"))).headers["x-cache"] == "HIT-EXACT"


async def test_upstream_error_keeps_status_and_shape(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.handler = lambda request: httpx.Response(
        429, json={"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    )
    r = await client.post("/v1/chat/completions", json=chat("hi"))
    error = assert_error(r, 429, None)
    assert error["message"] == "Rate limit reached" and error["code"] == "rate_limit_exceeded"
    assert r.headers["x-cache"] == "MISS"
    again = await client.post("/v1/chat/completions", json=chat("hi"))
    assert again.status_code == 429, "errors are never cached"


async def test_upstream_non_json_error(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.handler = lambda request: httpx.Response(500, text="<html>oops</html>")
    r = await client.post("/v1/chat/completions", json=chat("hi"))
    assert assert_error(r, 500, None)["type"] == "upstream_error"


async def test_upstream_down_is_502(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    upstream.handler = refuse
    assert_error(await client.post("/v1/chat/completions", json=chat("hi")), 502, None)
    streamed = await client.post("/v1/chat/completions", json=chat("hi", stream=True))
    assert_error(streamed, 502, None)


async def test_upstream_timeout_is_504(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    upstream.handler = slow
    assert_error(await client.post("/v1/chat/completions", json=chat("hi")), 504, None)


async def test_no_upstream_is_503_saying_how_to_configure(make_client) -> None:  # type: ignore[no-untyped-def]
    # With local answers for every model turned off, a model without a route has nowhere to go.
    async with make_client(upstream_base_url=None, cascade_local_without_upstream=False) as client:
        r = await client.post("/v1/chat/completions", json=chat("hi"))
    error = assert_error(r, 503, None)
    assert "CACHECADE_UPSTREAM_BASE_URL" in error["message"] and error["code"] == "upstream_not_configured"
    assert r.headers["x-cache"] == "MISS" and r.headers["x-served-by"] == "none"


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nope"), 404, None)
    assert_error(await client.get("/v1/chat/completions"), 405, None)


async def test_auth_passthrough_and_configured_key(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client() as client:
        await client.post("/v1/chat/completions", json=chat("a"), headers={"authorization": "Bearer caller"})
    async with make_client(upstream_api_key="sk-configured") as client:
        await client.post("/v1/chat/completions", json=chat("b"), headers={"authorization": "Bearer caller"})
    assert [r.headers.get("authorization") for r in upstream.requests] == ["Bearer caller", "Bearer sk-configured"]


async def test_an_oversized_body_is_a_413_refused_before_it_is_parsed(make_client: Any) -> None:
    """Over max_body_bytes: a 413 in OpenAI's shape, from Content-Length before reading, and from the bytes read
    when no length is declared (a chunked body); the server keeps answering."""
    async with make_client(max_body_bytes=64 * 1024) as client:
        big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "word " * 20_000}]})
        r = await client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert "65536" in error["message"]

        async def trickle() -> AsyncIterator[bytes]:  # no Content-Length: refused once the bytes pass the limit
            for _ in range(200):
                yield b" " * 1024

        chunked = await client.post("/v1/chat/completions", content=trickle(),
                                    headers={"content-type": "application/json"})  # fmt: skip
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        assert (await client.get("/healthz")).status_code == 200
        small = await client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                       "content": "hi"}]})  # fmt: skip
        assert small.status_code == 200


async def test_a_prompt_over_the_token_limit_is_a_400_naming_it(make_client: Any, upstream: FakeUpstream) -> None:
    async with make_client(max_prompt_tokens=50) as client:
        r = await client.post("/v1/chat/completions", json=chat("word " * 200))
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "messages" and error["code"] == "context_length_exceeded" and "50" in error["message"]
        legacy = await client.post("/v1/completions", json={"model": "m", "prompt": "word " * 200})
        assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "prompt"
        assert (await client.post("/v1/chat/completions", json=chat("hi"))).status_code == 200
    assert len(upstream.requests) == 1  # the long prompts never reached the upstream


async def test_a_body_trickled_past_the_timeout_is_a_408(make_client: Any) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b'{"model": "m", '
        await asyncio.sleep(0.5)
        yield b'"messages": []}'

    async with make_client(body_timeout_s=0.1) as client:
        r = await client.post("/v1/chat/completions", content=trickle(), headers={"content-type": "application/json"})
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"model": "m", "messages": [{"role": "user", "content": "a \ud800 b"}]}', "messages.0.content"),
        (rb'{"model": "m", "messages": [{"role": "user", "content": "ok"}], "user": "\udfff"}', "user"),
    ],
)
async def test_a_lone_surrogate_is_a_400_naming_where(
    client: httpx.AsyncClient, upstream: FakeUpstream, raw: bytes, param: str
) -> None:
    """JSON lets a lone UTF-16 surrogate in as an escape; it is not text (no tokenizer, embedder or upstream takes
    it), so it is refused by name. A pair of escapes (an emoji) is text, and answered."""
    r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, param)
    assert upstream.requests == []
    pair = rb'{"model": "m", "messages": [{"role": "user", "content": "smile \ud83d\ude00"}]}'
    ok = await client.post("/v1/chat/completions", content=pair, headers={"content-type": "application/json"})
    assert ok.status_code == 200 and json.loads(upstream.requests[-1].content)["messages"][0]["content"] == "smile 😀"


async def test_a_model_name_that_is_not_header_text_is_escaped_in_headers(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    """x-served-by names the upstream model the client asked for: non-Latin text and CR/LF in it are
    percent-encoded (it was a 500 for a model named in another script, found by bench/fuzz.py)."""
    for model, shown in (("модель", "upstream:%D0%BC%D0%BE%D0%B4%D0%B5%D0%BB%D1%8C"),
                         ("m\r\nset-cookie: x=1", "upstream:m%0D%0Aset-cookie: x=1")):  # fmt: skip
        r = await client.post("/v1/chat/completions", json={**chat("Which model?"), "model": model})
        assert r.status_code == 200 and r.headers["x-served-by"] == shown and "set-cookie" not in r.headers


async def test_an_infinite_number_is_a_400(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """Python's json reads 1e400 as infinity; no field takes it."""
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "cache": {"ttl": 1e400}}'
    r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, "cache.ttl")
    assert upstream.requests == []


async def test_non_ascii_headers_reach_the_upstream_as_sent(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """UTF-8 in a forwarded header (x-request-id, openai-project) was a 500 on a miss: httpx refuses non-ASCII
    str values. The upstream gets the client's bytes (found by bench/fuzz.py)."""
    sent = {"x-request-id": "ид-😀".encode(), "openai-project": "проект".encode()}
    r = await client.post("/v1/chat/completions", json=chat("A question never asked before?"), headers=sent)
    assert r.status_code == 200 and r.headers["x-cache"] == "MISS"
    forwarded = upstream.requests[-1].headers
    assert forwarded.raw and dict(forwarded.raw)[b"openai-project"] == sent["openai-project"]
    assert dict(forwarded.raw)[b"x-request-id"] == sent["x-request-id"]
