"""Single flight: identical concurrent misses reach the upstream once, in one replica and across replicas."""

from __future__ import annotations

import asyncio

import httpx

from tests.proxy.conftest import FakeUpstream, chat, chat_response, sse_body, words

Q = "What is the tallest mountain on Earth?"


def slow(upstream: FakeUpstream, seconds: float = 0.3, finish: str = "stop") -> None:
    """The upstream takes a while, so identical requests overlap."""

    async def answer(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(seconds)
        if b'"stream":true' in request.content.replace(b" ", b""):
            return httpx.Response(200, content=sse_body(words("Mount Everest."), finish=finish),
                                  headers={"content-type": "text/event-stream"})  # fmt: skip
        return httpx.Response(200, json=chat_response("Mount Everest.", finish=finish))

    upstream.handler = answer


async def test_identical_misses_in_one_replica_reach_the_upstream_once(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    slow(upstream)
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(Q)) for _ in range(5)))
    assert len(upstream.requests) == 1
    assert all(a.status_code == 200 and a.json()["choices"][0]["message"]["content"] == "Mount Everest."
               for a in answers)  # fmt: skip
    assert sorted(a.headers.get("x-cache-coalesced", "-") for a in answers) == ["-"] + ["true"] * 4
    assert sum(a.headers["x-cache"] == "HIT-EXACT" for a in answers) == 4


async def test_a_streaming_leader_serves_waiting_requests_when_its_stream_ends(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    slow(upstream)

    async def streamed() -> str:
        async with client.stream("POST", "/v1/chat/completions", json=chat(Q, stream=True)) as r:
            return "".join([line async for line in r.aiter_lines()])

    stream_task = asyncio.create_task(streamed())
    await asyncio.sleep(0.05)  # the stream leads
    plain = await client.post("/v1/chat/completions", json=chat(Q))
    assert "[DONE]" in await stream_task
    assert plain.headers["x-cache-coalesced"] == "true" and len(upstream.requests) == 1


async def test_an_answer_that_cannot_be_stored_releases_the_waiters(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    slow(upstream, finish="length")  # truncated: never cached
    answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat(Q)) for _ in range(3)))
    assert all(a.status_code == 200 for a in answers) and len(upstream.requests) == 3


async def test_identical_misses_on_two_replicas_reach_the_upstream_once(make_replica, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    slow(upstream)
    async with make_replica("a") as a, make_replica("b") as b:
        answers = await asyncio.gather(*(c.post("/v1/chat/completions", json=chat(Q)) for c in (a, b, a, b)))
    assert len(upstream.requests) == 1 and all(r.status_code == 200 for r in answers)
    assert sum(r.headers.get("x-cache-coalesced") == "true" for r in answers) == 3
