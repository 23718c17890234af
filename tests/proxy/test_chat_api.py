"""Chat completions through the app: cache tiers, headers, controls, isolation, streaming."""

from __future__ import annotations

import json

import httpx

from tests.proxy.conftest import FakeUpstream, chat, sse_body, words

Q = "What is the capital of France?"
PARAPHRASE = "What's the capital city of France?"


def sse_events(text: str) -> list[dict]:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_miss_then_exact_hit(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    first = await client.post("/v1/chat/completions", json=chat(Q))
    assert first.status_code == 200
    assert first.headers["x-cache"] == "MISS" and first.headers["x-served-by"] == "upstream:up-model"
    assert first.headers["x-request-id"]
    second = await client.post("/v1/chat/completions", json=chat(Q))
    assert second.headers["x-cache"] == "HIT-EXACT" and second.headers["x-served-by"] == "cache"
    assert second.headers["x-cache-entry-id"] == first.headers["x-cache-entry-id"]
    assert float(second.headers["x-cache-similarity"]) == 1.0 and int(second.headers["age"]) >= 0
    body = second.json()
    assert body["choices"][0]["message"]["content"] == upstream.answer
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["id"] != "chatcmpl-up"
    assert body["usage"]["completion_tokens"] == 7
    assert len(upstream.requests) == 1


async def test_paraphrase_is_a_semantic_hit(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cache_threshold=0.85) as client:
        await client.post("/v1/chat/completions", json=chat(Q))
        hit = await client.post("/v1/chat/completions", json=chat(PARAPHRASE))
    assert hit.headers["x-cache"] == "HIT-SEMANTIC"
    assert 0.85 <= float(hit.headers["x-cache-similarity"]) < 1.0
    assert hit.headers["x-cache-threshold"] == "0.8500"
    assert len(upstream.requests) == 1


async def test_context_and_tenant_are_hard_partitions(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    await client.post("/v1/chat/completions", json=chat(Q), headers={"authorization": "Bearer key-a"})
    other_system = {"model": "up-model", "messages": [{"role": "system", "content": "Answer in German."},
                                                      {"role": "user", "content": Q}]}  # fmt: skip
    r1 = await client.post("/v1/chat/completions", json=other_system, headers={"authorization": "Bearer key-a"})
    r2 = await client.post("/v1/chat/completions", json=chat(Q), headers={"authorization": "Bearer key-b"})
    r3 = await client.post("/v1/chat/completions", json=chat(Q, model="other-model"),
                           headers={"authorization": "Bearer key-a"})  # fmt: skip
    r4 = await client.post("/v1/chat/completions", json=chat(Q), headers={"authorization": "Bearer key-a"})
    assert [r.headers["x-cache"] for r in (r1, r2, r3, r4)] == ["MISS", "MISS", "MISS", "HIT-EXACT"]
    assert len(upstream.requests) == 4


async def test_namespace_partition_and_stricter_threshold(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat(Q, cache={"namespace": "a"}))
    other_ns = await client.post("/v1/chat/completions", json=chat(Q, cache={"namespace": "b"}))
    assert other_ns.headers["x-cache"] == "MISS"
    strict = await client.post(
        "/v1/chat/completions", json=chat(PARAPHRASE, cache={"namespace": "a", "threshold": 0.999})
    )
    assert strict.headers["x-cache"] == "MISS" and strict.headers["x-cache-threshold"] == "0.9990"


async def test_looser_request_threshold_is_rejected(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    r = await client.post("/v1/chat/completions", json=chat(Q, cache={"threshold": 0.5}))
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "cache.threshold"
    assert upstream.requests == []


async def test_cache_field_is_stripped_and_unknown_fields_pass_through(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    await client.post("/v1/chat/completions", json=chat(Q, cache={"namespace": "x"}, seed=7, vendor_flag={"a": 1}))
    sent = upstream.bodies()[0]
    assert "cache" not in sent and sent["seed"] == 7 and sent["vendor_flag"] == {"a": 1}


async def test_cache_control_no_store_no_cache_max_age(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    r = await client.post("/v1/chat/completions", json=chat(Q), headers={"cache-control": "no-store"})
    assert r.headers["x-cache"] == "MISS" and "x-cache-entry-id" not in r.headers
    assert (await client.post("/v1/chat/completions", json=chat(Q))).headers["x-cache"] == "MISS"
    bypass = await client.post("/v1/chat/completions", json=chat(Q), headers={"cache-control": "no-cache"})
    assert bypass.headers["x-cache"] == "BYPASS" and bypass.headers["x-cache-bypass-reason"] == "no-cache"
    assert (await client.post("/v1/chat/completions", json=chat(Q))).headers["x-cache"] == "HIT-EXACT"
    fresh = await client.post("/v1/chat/completions", json=chat(Q), headers={"cache-control": "max-age=0"})
    assert fresh.headers["x-cache"] == "MISS"  # any stored answer is older than 0 s
    recent = await client.post("/v1/chat/completions", json=chat(Q), headers={"cache-control": "max-age=3600"})
    assert recent.headers["x-cache"] == "HIT-EXACT"
    bad = await client.post("/v1/chat/completions", json=chat(Q), headers={"cache-control": "max-age=soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Cache-Control"
    assert len(upstream.requests) == 4


async def test_uncacheable_requests_bypass(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=chat(Q, temperature=1.5))
        assert r.headers["x-cache"] == "BYPASS" and r.headers["x-cache-bypass-reason"] == "temperature"
    r = await client.post("/v1/chat/completions", json=chat(Q, n=2))
    assert r.headers["x-cache-bypass-reason"] == "n"
    assert len(upstream.requests) == 3


async def test_incomplete_answers_are_not_cached(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    from tests.proxy.conftest import chat_response

    upstream.handler = lambda request: httpx.Response(200, json=chat_response("Paris is", finish="length"))
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=chat(Q, max_tokens=2))
        assert r.headers["x-cache"] == "MISS" and r.json()["choices"][0]["finish_reason"] == "length"
    assert len(upstream.requests) == 2


async def test_stored_answer_longer_than_max_tokens_is_not_served(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat(Q))  # stored with 7 completion tokens
    short = await client.post("/v1/chat/completions", json=chat(Q, max_tokens=3))
    assert short.headers["x-cache"] == "MISS"
    enough = await client.post("/v1/chat/completions", json=chat(Q, max_completion_tokens=50))
    assert enough.headers["x-cache"] == "HIT-EXACT"


async def test_stream_miss_passes_through_then_replays(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    miss = await client.post("/v1/chat/completions", json=chat(Q, stream=True))
    assert miss.headers["x-cache"] == "MISS" and miss.headers["content-type"].startswith("text/event-stream")
    assert miss.content == sse_body(words(upstream.answer))  # byte-for-byte pass-through
    hit = await client.post("/v1/chat/completions", json=chat(Q, stream=True, stream_options={"include_usage": True}))
    assert hit.headers["x-cache"] == "HIT-EXACT"
    events = sse_events(hit.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == upstream.answer
    assert len(events) > 4, "replayed as word-sized chunks, not one blob"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"  # the upstream streamed no usage: none made up
    plain = await client.post("/v1/chat/completions", json=chat(Q))
    assert plain.headers["x-cache"] == "HIT-EXACT"
    assert plain.json()["choices"][0]["message"]["content"] == upstream.answer
    assert len(upstream.requests) == 1


async def test_interrupted_stream_is_not_cached(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.handler = lambda request: httpx.Response(200, content=sse_body(["Par", "is"], done=False),
                                                      headers={"content-type": "text/event-stream"})  # fmt: skip
    await client.post("/v1/chat/completions", json=chat(Q, stream=True))
    again = await client.post("/v1/chat/completions", json=chat(Q, stream=True))
    assert again.headers["x-cache"] == "MISS"


async def test_nonstream_answer_replays_as_stream(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat(Q))
    hit = await client.post("/v1/chat/completions", json=chat(Q, stream=True))
    assert hit.headers["x-cache"] == "HIT-EXACT"
    events = sse_events(hit.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert "usage" not in events[-1]
    with_usage = await client.post(
        "/v1/chat/completions", json=chat(Q, stream=True, stream_options={"include_usage": True})
    )
    last = sse_events(with_usage.text)[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 7


async def test_legacy_completions_miss_then_hit(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    body = {"model": "up-model", "prompt": "The capital of France is"}
    assert (await client.post("/v1/completions", json=body)).headers["x-cache"] == "MISS"
    hit = await client.post("/v1/completions", json=body)
    assert hit.headers["x-cache"] == "HIT-EXACT" and hit.json()["choices"][0]["text"] == upstream.answer
    streamed = await client.post("/v1/completions", json={**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in sse_events(streamed.text)) == upstream.answer


async def test_store_failure_fails_open(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    from cache.errors import StoreError

    async def broken(*args: object, **kwargs: object) -> None:
        raise StoreError("disk gone")

    async with make_client() as client:
        store = client._transport.app.state.services.cache.store  # type: ignore[attr-defined]
        store.put = broken
        stored = await client.post("/v1/chat/completions", json=chat(Q))
        store.get_exact = broken
        looked_up = await client.post("/v1/chat/completions", json=chat(Q))
    assert stored.status_code == 200 and stored.headers["x-cache"] == "MISS"
    assert "x-cache-entry-id" not in stored.headers
    assert looked_up.status_code == 200 and looked_up.json()["choices"][0]["message"]["content"] == upstream.answer
    assert looked_up.headers["x-cache"] == "BYPASS" and looked_up.headers["x-cache-bypass-reason"] == "cache-error"


async def test_sharing_across_tenants_only_when_configured(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(share_cache_across_tenants=True) as client:
        await client.post("/v1/chat/completions", json=chat(Q), headers={"authorization": "Bearer key-a"})
        shared = await client.post("/v1/chat/completions", json=chat(Q), headers={"authorization": "Bearer key-b"})
    assert shared.headers["x-cache"] == "HIT-EXACT"


async def test_streamed_answer_of_unknown_length_is_not_served_under_a_token_limit(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    await client.post("/v1/chat/completions", json=chat(Q, stream=True))  # the fake streams no usage
    limited = await client.post("/v1/chat/completions", json=chat(Q, max_tokens=10))
    assert limited.headers["x-cache"] == "MISS"
    unlimited = await client.post("/v1/chat/completions", json=chat(Q, stream=True))
    assert unlimited.headers["x-cache"] == "HIT-EXACT"


async def test_long_prompts_differing_at_the_end_never_share_a_semantic_hit(
    client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    document = "The quick brown fox jumps over the lazy dog. " * 80  # far past the embedder's 256 tokens
    await client.post("/v1/chat/completions", json=chat(document + "Translate this into French."))
    other = await client.post("/v1/chat/completions", json=chat(document + "How many sentences are there?"))
    assert other.headers["x-cache"] == "MISS"
    same = await client.post("/v1/chat/completions", json=chat(document + "Translate this into French."))
    assert same.headers["x-cache"] == "HIT-EXACT"
    assert len(upstream.requests) == 2


async def test_odd_upstream_answers(client: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.handler = lambda request: httpx.Response(200, text="<html>login</html>")
    html = await client.post("/v1/chat/completions", json=chat("a"))
    assert html.status_code == 502 and html.json()["error"]["code"] == "upstream_unavailable"
    nan = b'{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"x"},' \
          b'"finish_reason":"stop","logprobs":{"content":[{"token":"x","logprob":-Infinity}]}}]}'  # fmt: skip
    upstream.handler = lambda request: httpx.Response(200, content=nan, headers={"content-type": "application/json"})
    for _ in range(2):
        r = await client.post("/v1/chat/completions", json=chat("b"))
        assert r.status_code == 200 and r.headers["x-cache"] == "MISS" and b"-Infinity" in r.content
    odd = b'data: {"choices":[{"index":null,"delta":{"content":7}}]}\n\ndata: [DONE]\n\n'
    upstream.handler = lambda request: httpx.Response(200, content=odd, headers={"content-type": "text/event-stream"})
    relayed = await client.post("/v1/chat/completions", json=chat("c", stream=True))
    assert relayed.status_code == 200 and relayed.content == odd


async def test_lone_surrogate_and_deep_nesting_are_not_500(client: httpx.AsyncClient) -> None:
    surrogate = b'{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}'
    refused = await client.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages.0.content"  # not text
    deep = b"[" * 100_000 + b"]" * 100_000
    r = await client.post("/v1/chat/completions", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400
