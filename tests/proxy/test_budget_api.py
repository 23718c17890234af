"""Token budgets through the API: limits per key, 429s and x-ratelimit-* headers, the per-request budget, the
clamp, the estimate from cached neighbours, and budget-aware local decoding."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from proxy.context import key_id
from proxy.tokens import TokenCounter
from tests.proxy.conftest import ADMIN, FakeUpstream, chat, chat_response

ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}


def as_key(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def limits(key: str, **values: int) -> dict[str, Any]:
    return {"key_limits": {key_id(key): values}}


async def test_limits_are_per_key_and_answer_429_in_openai_shape(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(**limits(ALICE, tokens_per_day=60)) as client:
        first = await client.post("/v1/chat/completions", json=chat("one?", max_tokens=10), headers=as_key(ALICE))
        assert first.status_code == 200, first.text
        # The upstream reported 18 tokens (11 + 7): that, not the reservation, is what the key spent.
        assert first.headers["x-ratelimit-limit-tokens"] == "60"
        assert first.headers["x-ratelimit-remaining-tokens"] == "42"
        assert first.headers["x-ratelimit-reset-tokens"].endswith("s")
        second = await client.post("/v1/chat/completions", json=chat("two?", max_tokens=10), headers=as_key(ALICE))
        assert second.headers["x-ratelimit-remaining-tokens"] == "24"
        # 24 left: the answer is capped at what the budget still pays for after the prompt.
        third = await client.post("/v1/chat/completions", json=chat("three?", max_tokens=30), headers=as_key(ALICE))
        prompt = TokenCounter().prompt_tokens("chat", chat("three?"))
        assert third.status_code == 200 and upstream.bodies()[-1]["max_tokens"] == 24 - prompt
        fourth = await client.post("/v1/chat/completions", json=chat("four?", max_tokens=30), headers=as_key(ALICE))
        assert fourth.status_code == 429
        error = fourth.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
        assert "TPD" in error["message"] and "Limit 60, Used 54" in error["message"]
        assert fourth.headers["x-ratelimit-remaining-tokens"] == "6" and int(fourth.headers["retry-after"]) >= 1
        # Bob has no limit: no headers, no refusals; Alice's spending is not his.
        bob = await client.post("/v1/chat/completions", json=chat("three?", max_tokens=30), headers=as_key(BOB))
        assert bob.status_code == 200 and "x-ratelimit-limit-tokens" not in bob.headers
    assert len(upstream.requests) == 4


async def test_cache_hits_cost_nothing(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(**limits(ALICE, tokens_per_day=1000)) as client:
        await client.post("/v1/chat/completions", json=chat("What is the capital of France?"), headers=as_key(ALICE))
        hit = await client.post("/v1/chat/completions", json=chat("What is the capital of France?"),
                                headers=as_key(ALICE))  # fmt: skip
        assert hit.headers["x-cache"] == "HIT-EXACT" and hit.headers["x-ratelimit-remaining-tokens"] == "982"
        assert hit.headers["x-tokens-saved"] == "18"
        stats = (await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()["tokens"]
    assert stats["saved_by_cache"] == 18 and stats["upstream_prompt"] == 11 and stats["upstream_completion"] == 7


async def test_concurrent_requests_cannot_overspend(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(**limits(ALICE, tokens_per_minute=200)) as client:
        bodies = [chat(f"question number {i}?", max_tokens=40, cache={"namespace": f"n{i}"}) for i in range(12)]
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=b, headers=as_key(ALICE)) for b in bodies)
        )
        usage = (await client.get("/admin/budgets/usage", params={"key_id": key_id(ALICE)},
                                  headers=ADMIN_HEADERS)).json()  # fmt: skip
    codes = sorted(a.status_code for a in answers)
    # Each reserves ~51 (prompt + 40) of 200: 3 fit at once, more only once earlier ones have settled (spent 18),
    # which depends on timing (prompt tokens are counted in a worker thread, so all may reserve before any settles).
    assert set(codes) == {200, 429} and codes.count(200) >= 3
    spent = usage["windows"][0]
    assert spent["window"] == "minute" and spent["used"] == 18 * codes.count(200) <= 200
    assert len(upstream.requests) == codes.count(200)


async def test_requests_per_minute(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(default_key_requests_per_minute=2) as client:
        codes = [(await client.post("/v1/chat/completions", json=chat(f"q{i}?"), headers=as_key(BOB))).status_code
                 for i in range(3)]  # fmt: skip
        refused = await client.post("/v1/chat/completions", json=chat("q?"), headers=as_key(BOB))
        other = await client.post("/v1/chat/completions", json=chat("q?"), headers=as_key(ALICE))
    assert codes == [200, 200, 429] and refused.json()["error"]["type"] == "requests"
    assert (
        refused.headers["x-ratelimit-limit-requests"] == "2"
        and refused.headers["x-ratelimit-remaining-requests"] == "0"
    )
    assert other.status_code == 200  # the default applies per key, not to all keys together


async def test_bad_budget_values_are_400s_naming_the_parameter(client: httpx.AsyncClient) -> None:
    for value in ("0", "-5", "ten", "1.5", "²".encode()):
        r = await client.post("/v1/chat/completions", json=chat("q?"), headers={"x-token-budget": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "x-token-budget", value
    r = await client.post("/v1/chat/completions", json=chat("q?", token_budget="12"))
    assert r.status_code == 400 and r.json()["error"]["param"] == "token_budget"


async def test_per_request_budget_caps_the_answer_and_is_not_forwarded(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    r = await client.post("/v1/chat/completions", json=chat("q?", max_tokens=500, token_budget=64),
                          headers={"x-token-budget": "40"})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-token-cap"] == "40"
    sent = upstream.bodies()[-1]
    assert sent["max_tokens"] == 40 and "token_budget" not in sent and "cache" not in sent


async def test_clamp_to_estimate_never_above_the_client(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(budget_clamp_factor=2.0, budget_clamp_min_tokens=4) as client:
        r = await client.post("/v1/chat/completions", json=chat("What is the capital of Spain?", max_tokens=500))
        assert r.headers["x-token-estimate-source"] == "prompt" and r.headers["x-token-estimate"] == "48"
        assert upstream.bodies()[-1]["max_tokens"] == 96
        # Now a stored neighbour (7 tokens) is the estimate: the clamp is 14.
        r = await client.post("/v1/chat/completions", json=chat("What is the capital of Italy?", max_tokens=500))
        assert r.headers["x-token-estimate-source"].startswith("neighbours") and r.headers["x-token-cap"] == "14"
        assert upstream.bodies()[-1]["max_tokens"] == 14
        await client.post("/v1/chat/completions", json=chat("What is the capital of Peru?", max_tokens=10))
        assert upstream.bodies()[-1]["max_tokens"] == 10  # the client asked for less than the clamp
        await client.post("/v1/chat/completions", json=chat("What is the capital of Chile?"))
        assert upstream.bodies()[-1]["max_tokens"] == 14  # no client limit: the clamp sets one


async def test_estimate_comes_from_cached_neighbours(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    await client.post("/v1/chat/completions", json=chat("How many legs does a spider have?"))
    # Near, but not near enough to be a cache hit: the stored answer's length (7 tokens) is the estimate.
    r = await client.post("/v1/chat/completions", json=chat("How many legs does an ant have?"))
    assert r.headers["x-cache"] == "MISS"
    assert r.headers["x-token-estimate-source"] == "neighbours;n=1" and r.headers["x-token-estimate"] == "7"
    other_tenant = await client.post("/v1/chat/completions", json=chat("How many legs does a cat have?"),
                                     headers=as_key(BOB))  # fmt: skip
    assert other_tenant.headers["x-token-estimate-source"] == "prompt"  # neighbours never cross tenants


async def test_truncated_upstream_answer_is_returned_but_not_cached(client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    upstream.handler = lambda request: httpx.Response(200, json=chat_response("Paris is", finish="length"))
    r = await client.post("/v1/chat/completions", json=chat("q?"), headers={"x-token-budget": "2"})
    again = await client.post("/v1/chat/completions", json=chat("q?"), headers={"x-token-budget": "2"})
    assert r.json()["choices"][0]["finish_reason"] == "length" and again.headers["x-cache"] == "MISS"


async def test_streamed_answer_settles_with_its_counted_tokens(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(**limits(ALICE, tokens_per_day=500)) as client:
        async with client.stream("POST", "/v1/chat/completions", json=chat("q?", stream=True, max_tokens=100),
                                 headers=as_key(ALICE)) as r:  # fmt: skip
            assert int(r.headers["x-ratelimit-remaining-tokens"]) < 500  # the reservation
            text = "".join([line async for line in r.aiter_lines()])
        assert "[DONE]" in text
        await asyncio.sleep(0.05)  # settling runs once the stream has closed
        usage = (await client.get("/admin/budgets/usage", params={"key_id": key_id(ALICE)},
                                  headers=ADMIN_HEADERS)).json()  # fmt: skip
    # No usage in this stream: the prompt estimate plus our count of the answer's text.
    counter = TokenCounter()
    expected = counter.prompt_tokens("chat", chat("q?")) + counter.count("Paris is the capital of France.")
    assert usage["windows"][0]["used"] == expected


async def test_admin_changes_budgets_at_run_time(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client() as client:
        ok = await client.post("/v1/chat/completions", json=chat("q1?"), headers=as_key(ALICE))
        assert "x-ratelimit-limit-tokens" not in ok.headers
        bad = await client.put("/admin/budgets", json={"keys": {ALICE: {"tokens_per_day": 5}}}, headers=ADMIN_HEADERS)
        assert bad.status_code == 400 and "key-id" in bad.json()["error"]["message"]
        put = await client.put("/admin/budgets", json={"keys": {key_id(ALICE): {"tokens_per_day": 5}}},
                               headers=ADMIN_HEADERS)  # fmt: skip
        assert put.status_code == 200 and put.json()["keys"][key_id(ALICE)]["tokens_per_day"] == 5
        refused = await client.post("/v1/chat/completions", json=chat("q2?"), headers=as_key(ALICE))
        assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-tokens"] == "5"
        got = (await client.get("/admin/budgets", headers=ADMIN_HEADERS)).json()
    assert got["keys"] == {key_id(ALICE): {"tokens_per_minute": None, "tokens_per_day": 5,
                                           "tokens_per_month": None, "requests_per_minute": None}}  # fmt: skip


async def test_local_answer_cut_at_the_budget_escalates(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    route = {"cachecade/auto": ["smollm2", "upstream:up-model"]}
    async with make_client(cascade_routes=route, cascade_thresholds={"smollm2": 0.0}) as client:
        body = {"model": "cachecade/auto", "messages": [{"role": "user", "content": "Tell me about Paris."}]}
        r = await client.post("/v1/chat/completions", json=body, headers={"x-token-budget": "3"})
        stats = (await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()["tokens"]
    assert r.headers["x-escalated"] == "smollm2:length" and r.headers["x-served-by"] == "upstream:up-model"
    assert upstream.bodies()[-1]["max_tokens"] == 3 and stats["local_spent"] > 3


async def test_voting_tier_samples_within_the_budget(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    route = {"cachecade/auto": ["smollm2"]}
    question = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    settings = {"cascade_routes": route, "cascade_samples": {"smollm2": 5}, "upstream_base_url": None}
    async with make_client(**settings) as client:
        spent = []
        for budget in ("8", "400"):
            headers = {"x-token-budget": budget, "cache-control": "no-store"}
            r = await client.post("/v1/chat/completions", headers=headers,
                                  json={"model": "cachecade/auto", "messages": question})  # fmt: skip
            assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
            spent.append((await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()["tokens"]["local_spent"])
    # A tight budget decodes greedily (one sample); a generous one votes with several, each within its share.
    tight, generous = spent[0], spent[1] - spent[0]
    assert generous > tight
