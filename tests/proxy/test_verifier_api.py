"""The verified semantic tier through the request path: a rewording is served with x-cache-verifier: accept, a
question with the same words in another order or another number is a miss (reject), thresholds are tunable per
namespace and stricter-only per request, and the counts show in /admin/stats and /metrics."""

from __future__ import annotations

from typing import Any

from tests.proxy.conftest import ADMIN, FakeUpstream, chat
from tests.proxy.test_metrics import scrape, value

AUTH = {"authorization": f"Bearer {ADMIN}"}
CHAT = "/v1/chat/completions"
STORED = "What is the capital city of France?"
VARIANTS = ["what is the capital city of france", "what's the capital city of france?", "What is the capital city "
            "of France", "WHAT IS THE CAPITAL CITY OF FRANCE?", "  What is the capital city of France?  ",
            "please tell me what is the capital city of France?", "can you tell me what is the capital city of "
            "France?", "What's the capital city of France?"]  # fmt: skip


async def test_rewordings_are_served_with_the_verifier_accepting(make_client: Any, upstream: FakeUpstream) -> None:
    async with make_client(cache_verifier="default") as client:
        await client.post(CHAT, json=chat(STORED))
        hits = [await client.post(CHAT, json=chat(v)) for v in VARIANTS]
        stats = (await client.get("/admin/stats", headers=AUTH)).json()
    served = [h for h in hits if h.headers["x-cache"] == "HIT-SEMANTIC"]
    scores = {v: h.headers.get("x-cache-verifier-score") for v, h in zip(VARIANTS, hits, strict=True)}
    assert len(served) == len(VARIANTS), scores
    assert all(h.headers["x-cache-verifier"] == "accept" for h in served)
    assert all(0 <= float(h.headers["x-cache-verifier-score"]) <= 1 for h in served)
    assert stats["verifier_accepts"] == len(VARIANTS) and len(upstream.requests) == 1


async def test_same_words_in_another_order_is_a_miss(make_client: Any, upstream: FakeUpstream) -> None:
    async with make_client(cache_verifier="default") as client:
        await client.post(CHAT, json=chat("How do I convert dollars to euros?"))
        swapped = await client.post(CHAT, json=chat("How do I convert euros to dollars?"))
        found = await scrape(client)
        stats = (await client.get("/admin/stats", headers=AUTH)).json()
        needed = (await client.get("/admin/config", headers=AUTH)).json()["verifier_threshold"]
    assert swapped.headers["x-cache"] == "MISS" and swapped.headers["x-cache-verifier"] == "reject"
    assert float(swapped.headers["x-cache-verifier-score"]) < needed
    assert stats["verifier_rejects"] == 1 and len(upstream.requests) == 2
    assert value(found, "cachecade_cache_verifier_decisions_total", decision="reject") == 1
    # Server-Timing says what the lookup cost and how much of it was the verifier.
    timings = dict(part.strip().split(";dur=") for part in swapped.headers["server-timing"].split(","))
    assert 0 < float(timings["verifier"]) <= float(timings["cache"])


async def test_thresholds_per_namespace_and_stricter_only_per_request(make_client: Any) -> None:
    """A true paraphrase the verifier accepts at about 0.89: served by default, a miss under a stricter threshold
    set per request or per namespace (a looser one per request is a 400)."""
    spider, spiders = "How many legs does a spider have?", "How many legs do spiders have?"
    async with make_client(cache_verifier="default") as client:
        await client.post(CHAT, json=chat(spider))
        looser = await client.post(CHAT, json=chat(spiders, cache={"verifier_threshold": 0.0}))
        assert looser.status_code == 400 and looser.json()["error"]["param"] == "cache.verifier_threshold"
        keep = {"cache-control": "no-store"}  # misses that leave no exact entry behind
        strict = await client.post(CHAT, json=chat(spiders, cache={"verifier_threshold": 0.99}), headers=keep)
        assert strict.headers["x-cache"] == "MISS" and strict.headers["x-cache-verifier"] == "reject"
        put = await client.put("/admin/config", headers=AUTH, json={"verifier_namespace_thresholds": {"default": 0.99}})
        assert put.status_code == 200, put.text
        assert (await client.post(CHAT, json=chat(spiders), headers=keep)).headers["x-cache"] == "MISS"
        put = await client.put("/admin/config", headers=AUTH, json={"verifier_namespace_thresholds": {}})
        served = await client.post(CHAT, json=chat(spiders))
        assert served.headers["x-cache"] == "HIT-SEMANTIC" and served.headers["x-cache-verifier"] == "accept"
        bad = await client.put("/admin/config", headers=AUTH, json={"verifier_threshold": 1.5})
        assert bad.status_code == 400 and "verifier_threshold" in bad.text
        off = await client.put("/admin/config", headers=AUTH, json={"verifier_enabled": False, "threshold": 0.8})
        assert off.status_code == 200
        plain = await client.post(CHAT, json=chat("how many legs does a spider have"))
        assert plain.headers["x-cache"] == "HIT-SEMANTIC" and "x-cache-verifier" not in plain.headers
