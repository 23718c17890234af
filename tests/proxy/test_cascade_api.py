"""The cascade through the API: real local models (SmolLM2, Gemma 3) and a MockTransport upstream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.proxy.conftest import ADMIN, FakeUpstream

ROUTE = {"cachecade/auto": ["smollm2", "upstream:up-model"]}
SURE = 0.7  # SmolLM2 answers EASY at about 0.82
EASY = [{"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


def auto(messages: list[dict[str, Any]] = EASY, **extra: Any) -> dict[str, Any]:
    return {"model": "cachecade/auto", "messages": messages, "max_tokens": 32, **extra}


async def test_confident_answer_is_served_locally_and_cached(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": SURE}) as client:
        r = await client.post("/v1/chat/completions", json=auto())
        assert r.status_code == 200, r.text
        assert r.headers["x-served-by"] == "local:smollm2" and r.headers["x-local-gate"] == "pass"
        assert float(r.headers["x-local-confidence"]) >= SURE and "x-escalated" not in r.headers
        body = r.json()
        assert "Paris" in body["choices"][0]["message"]["content"] and body["model"] == "smollm2"
        assert body["usage"]["completion_tokens"] > 0 and upstream.requests == []
        again = await client.post("/v1/chat/completions", json=auto())
        assert again.headers["x-cache"] == "HIT-EXACT" and again.json()["choices"] == body["choices"]
        listed = (await client.get("/admin/entries", headers={"authorization": f"Bearer {ADMIN}"})).json()["data"]
        assert [e["tier"] for e in listed] == ["local:smollm2"]


async def test_low_confidence_escalates_to_the_upstream(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.99}) as client:
        r = await client.post("/v1/chat/completions", json=auto())
    assert r.status_code == 200 and r.headers["x-served-by"] == "upstream:up-model"
    assert r.headers["x-escalated"] == "smollm2:low-confidence" and "x-local-confidence" not in r.headers
    assert upstream.bodies()[-1]["model"] == "up-model"  # the route's upstream model, not the alias


async def test_cut_off_answer_escalates(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
        r = await client.post("/v1/chat/completions", json=auto(max_tokens=2))
    assert r.headers["x-escalated"] == "smollm2:length" and r.headers["x-served-by"] == "upstream:up-model"


async def test_tools_and_images_skip_local_tiers(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
        r = await client.post("/v1/chat/completions", json=auto(image))
    assert r.headers["x-escalated"] == "smollm2:unsupported" and r.headers["x-served-by"] == "upstream:up-model"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({"tools": tools}, {"n": 2}, {"logprobs": True}, {"response_format": {"type": "json_object"}}):
        async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
            r = await client.post("/v1/chat/completions", json=auto(**extra))
        assert r.headers["x-escalated"] == "smollm2:unsupported", extra


async def test_saturated_model_is_skipped(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    models = {"smollm2": {"path": "smollm2", "max_queue": 1}, "gemma3": {"path": "gemma3", "prompt": "few-shot"}}
    story = [{"role": "user", "content": "Write a long story about a robot."}]
    async with make_client(local_models=models, cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
        slow = asyncio.ensure_future(client.post("/v1/chat/completions", json=auto(story, max_tokens=200)))
        await asyncio.sleep(0.3)
        r = await client.post("/v1/chat/completions", json=auto())
        await slow
    assert r.headers["x-escalated"] == "smollm2:saturated" and r.headers["x-served-by"] == "upstream:up-model"


async def test_model_without_route_goes_straight_upstream(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
        r = await client.post("/v1/chat/completions", json={**auto(), "model": "gpt-4o"})
    assert r.headers["x-served-by"] == "upstream:gpt-4o" and "x-escalated" not in r.headers
    assert upstream.bodies()[-1]["model"] == "gpt-4o"


async def test_local_answer_streams_as_chunks(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": SURE}) as client:
        r = await client.post("/v1/chat/completions", json=auto(stream=True, stream_options={"include_usage": True}))
    assert r.headers["x-served-by"] == "local:smollm2" and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert "Paris" in text and len(events) > 3 and r.text.rstrip().endswith("data: [DONE]")
    assert events[-1]["usage"]["completion_tokens"] > 0


async def test_escalated_stream_comes_from_the_upstream(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.99}) as client:
        r = await client.post("/v1/chat/completions", json=auto(stream=True))
    assert r.headers["x-served-by"] == "upstream:up-model" and '"capital ' in r.text and "[DONE]" in r.text


async def test_no_upstream_last_tier_answers_ungated_and_uncached(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(upstream_base_url=None, cascade_thresholds={"smollm2": 0.99, "gemma3": 0.99}) as client:
        r = await client.post("/v1/chat/completions", json={**auto(), "model": "gpt-4o-mini"})
        again = await client.post("/v1/chat/completions", json={**auto(), "model": "gpt-4o-mini"})
    assert r.status_code == 200 and r.headers["x-served-by"] == "local:gemma3"
    assert r.headers["x-local-gate"] == "last-tier" and r.headers["x-escalated"] == "smollm2:low-confidence"
    assert "x-cache-entry-id" not in r.headers and again.headers["x-cache"] == "MISS"  # never cached


async def test_local_answers_not_cached_when_configured_off(make_client) -> None:  # type: ignore[no-untyped-def]
    settings = {"cascade_routes": ROUTE, "cascade_thresholds": {"smollm2": SURE}, "cascade_cache_local_answers": False}
    async with make_client(**settings) as client:
        await client.post("/v1/chat/completions", json=auto())
        again = await client.post("/v1/chat/completions", json=auto())
    assert again.headers["x-cache"] == "MISS" and again.headers["x-served-by"] == "local:smollm2"


async def test_legacy_completion_through_the_cascade(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": 0.0}) as client:
        r = await client.post("/v1/completions", json={"model": "cachecade/auto", "prompt": "One, two, three,",
                                                       "max_tokens": 40, "stop": ["\n"]})  # fmt: skip
    assert r.headers["x-served-by"] == "local:smollm2" and r.json()["object"] == "text_completion"


async def test_admin_tunes_the_cascade_at_run_time(make_client, upstream: FakeUpstream) -> None:  # type: ignore[no-untyped-def]
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with make_client(cascade_routes=ROUTE, cascade_thresholds={"smollm2": SURE}) as client:
        current = (await client.get("/admin/cascade", headers=auth)).json()
        assert current["thresholds"] == {"smollm2": SURE} and current["local_models"] == ["smollm2"]
        r = await client.put("/admin/cascade", json={"thresholds": {"smollm2": 0.99}}, headers=auth)
        assert r.status_code == 200 and r.json()["routes"] == ROUTE
        served = await client.post("/v1/chat/completions", json=auto(cache={"namespace": "after"}))
        assert served.headers["x-escalated"] == "smollm2:low-confidence"
        bad = await client.put("/admin/cascade", json={"thresholds": {"smollm2": 2}}, headers=auth)
        assert bad.status_code == 400 and "thresholds" in bad.json()["error"]["message"]
        unknown = await client.put("/admin/cascade", json={"routes": {"x": ["llama9"]}}, headers=auth)
        assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "routes"
        stats = (await client.get("/admin/stats", headers=auth)).json()["cascade"]
        assert stats["escalations"] == {"smollm2:low-confidence": 1}
        assert (await client.get("/admin/cascade")).status_code == 401


async def test_router_skips_a_failing_tier_and_tries_it_when_its_gate_changes(
    make_client, upstream: FakeUpstream
) -> None:  # type: ignore[no-untyped-def]
    """The gate rejects every SmolLM2 answer (threshold 0.99): once the tier has a record (5 answers here) and no
    neighbour passed, the next question skips SmolLM2 without running it, a question of another kind too (the
    tier's record decides where no neighbour does); a looser gate makes the same remembered scores pass, so the
    tier is tried again at once. (Streamed: the upstream's streamed answers are not compared with the rejected
    ones, so no label says the fake upstream's one answer makes them wrong.)"""
    countries = ["France", "Spain", "Italy", "Poland", "Portugal", "Austria"]

    def capital(country: str) -> dict[str, Any]:
        return auto([EASY[0], {"role": "user", "content": f"What is the capital city of {country}?"}], stream=True)

    settings = {"cascade_routes": ROUTE, "cascade_thresholds": {"smollm2": 0.99}, "cascade_router_explore": 0.0,
                "cascade_router_min_tries": 5}  # fmt: skip
    async with make_client(**settings) as client:
        for country in countries[:5]:
            tried = await client.post("/v1/chat/completions", json=capital(country))
            assert tried.headers["x-escalated"] in ("smollm2:low-confidence", "smollm2:length")  # gate said no
        skipped = await client.post("/v1/chat/completions", json=capital(countries[5]))
        assert skipped.headers["x-escalated"] == "smollm2:skipped-by-router"
        assert skipped.headers["x-served-by"] == "upstream:up-model"
        other = await client.post("/v1/chat/completions", json=auto([{"role": "user", "content": "How do I bake "
                                                                      "sourdough bread?"}]))  # fmt: skip
        assert other.headers["x-escalated"] == "smollm2:skipped-by-router"
        stats = (await client.get("/admin/stats", headers={"authorization": f"Bearer {ADMIN}"})).json()
        assert stats["cascade"]["router"]["skipped"] == {"smollm2": 2}
        assert stats["cascade"]["router"]["tiers"]["smollm2"]["remembered"] == 5
        assert stats["cascade"]["escalations"]["smollm2:skipped-by-router"] == 2
        put = await client.put("/admin/cascade", headers={"authorization": f"Bearer {ADMIN}"},
                               json={"thresholds": {"smollm2": 0.5}})  # fmt: skip
        assert put.status_code == 200
        again = await client.post("/v1/chat/completions", json=capital("Denmark"))
        assert "skipped-by-router" not in again.headers.get("x-escalated", "")  # they pass now: tried


NO_CACHE = {"cache-control": "no-store"}  # looked up (the router reads the embedding), never stored: no hits


async def test_escalations_label_the_gate_and_agreeing_ones_loosen_it(make_client) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2's answer is rejected at 0.99; the upstream says the same ("Paris is the capital of France."), so
    each escalation is a good label for SmolLM2's gate at that score. With max_error 0.5, five clean labels
    certify it (upper bound 0.45): the namespace's gate loosens to that score and the next answer is local."""
    settings = {"cascade_routes": ROUTE, "cascade_thresholds": {"smollm2": 0.99}, "cascade_router": False,
                "cache_max_error": 0.5, "learn_min_labels": 5}  # fmt: skip
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with make_client(**settings) as client:
        for _ in range(5):
            r = await client.post("/v1/chat/completions", json=auto(), headers=NO_CACHE)
            assert r.headers["x-served-by"] == "upstream:up-model"
            assert r.headers["x-escalated"] == "smollm2:low-confidence"
        local = await client.post("/v1/chat/completions", json=auto(), headers=NO_CACHE)
        assert local.headers["x-served-by"] == "local:smollm2", local.headers.get("x-escalated")
        learning = (await client.get("/admin/learning", headers=auth)).json()
        cascade = (await client.get("/admin/cascade", headers=auth)).json()
    (scope,) = [s for s in learning["scopes"] if s.startswith("local:smollm2/confidence/")]
    namespace = scope.split("/", 2)[2]
    assert learning["scopes"][scope]["labels"] == 5 and learning["scopes"][scope]["bad"] == 0
    assert {r["source"] for r in learning["scopes"][scope]["recent"]} == {"escalation"}
    decision = learning["scopes"][scope]["decision"]
    assert decision["reason"] == "loosened" and decision["bound"] <= 0.5
    assert cascade["namespace_thresholds"][namespace]["smollm2"] == decision["threshold"]
    assert cascade["thresholds"]["smollm2"] == 0.99  # the configured gate is untouched; the namespace's moved
    assert learning["stats"]["escalations"] == {"compared": 5, "agreed": 5, "disagreed": 0, "errors": 0}


async def test_a_wrong_local_answer_tightens_its_gate_and_teaches_the_router(make_client, upstream) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2's answer passes the gate (0.5); a shadow check finds the upstream saying otherwise: a bad label at
    its score tightens the namespace's gate past it, and the router learns that answer was wrong."""
    upstream.answer = "Lyon."
    settings = {"cascade_routes": ROUTE, "cascade_thresholds": {"smollm2": 0.5}, "cache_max_error": 0.05,
                "cache_shadow_share": 1.0, "cache_shadow_max_share": 1.0}  # fmt: skip
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with make_client(**settings) as client:
        first = await client.post("/v1/chat/completions", json=auto(), headers=NO_CACHE)
        assert first.headers["x-served-by"] == "local:smollm2"
        score = float(first.headers["x-local-confidence"])
        second = await client.post("/v1/chat/completions", json=auto(), headers=NO_CACHE)
        stats = (await client.get("/admin/stats", headers=auth)).json()
        cascade = (await client.get("/admin/cascade", headers=auth)).json()
    assert second.headers["x-served-by"] == "upstream:up-model"
    assert second.headers["x-escalated"] == "smollm2:low-confidence"
    (learnt,) = cascade["namespace_thresholds"].values()
    assert learnt["smollm2"] > score - 1e-4  # x-local-confidence is rounded to 4 places
    assert stats["learning"]["shadow"]["disagreed"] == 1 and stats["learning"]["threshold_changes"]["tightened"] == 1
    assert stats["cascade"]["router"]["tiers"]["smollm2"]["labelled_wrong"] >= 1
