"""POST /v1/feedback and thresholds learned from it, through the request path: a bad cached answer is deleted at
once, only the key that asked can label its answer, and with max_error set a bad semantic hit tightens the
namespace's threshold (shown in /admin/config, /admin/learning, /admin/stats and /metrics). On Redis, a label
given to one replica counts on every replica."""

from __future__ import annotations

from typing import Any

from tests.proxy.conftest import ADMIN, FakeUpstream, chat
from tests.proxy.test_metrics import scrape, value
from tests.proxy.test_shared_store import eventually

CHAT, FEEDBACK = "/v1/chat/completions", "/v1/feedback"
ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
KEY_A, KEY_B = {"authorization": "Bearer sk-tenant-a"}, {"authorization": "Bearer sk-tenant-b"}
Q = "How can I learn Python quickly?"
PARAPHRASE = "What is the fastest way to learn Python?"


async def test_a_bad_cached_answer_is_deleted_and_only_its_key_can_say_so(make_client: Any,
                                                                          upstream: FakeUpstream) -> None:  # fmt: skip
    async with make_client(cache_threshold=0.8) as client:
        await client.post(CHAT, json=chat(Q), headers=KEY_A)
        hit = await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
        assert hit.headers["x-cache"] == "HIT-SEMANTIC"
        request_id = hit.headers["x-request-id"]
        other = await client.post(FEEDBACK, json={"request_id": request_id, "good": False}, headers=KEY_B)
        assert other.status_code == 404 and other.json()["error"]["param"] == "request_id"
        unknown = await client.post(FEEDBACK, json={"request_id": "no-such-request", "good": False}, headers=KEY_A)
        assert unknown.status_code == 404
        bad_body = await client.post(FEEDBACK, json={"request_id": request_id}, headers=KEY_A)
        assert bad_body.status_code == 400 and bad_body.json()["error"]["param"] == "good"
        given = await client.post(FEEDBACK, json={"request_id": request_id, "good": False}, headers=KEY_A)
        assert given.status_code == 200, given.text
        assert given.json() == {"object": "feedback", "request_id": request_id, "good": False, "tier": "semantic",
                                "entry_deleted": True}  # fmt: skip
        again = await client.post(FEEDBACK, json={"request_id": request_id, "good": True}, headers=KEY_A)
        assert again.status_code == 409
        after = await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
        stats = (await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()
    assert after.headers["x-cache"] == "MISS" and len(upstream.requests) == 2  # the bad answer is gone
    assert stats["learning"]["labels"] == {"good": 0, "bad": 1} and stats["learning"]["entries_deleted"] == 1


async def test_a_good_label_keeps_the_entry(make_client: Any) -> None:
    async with make_client() as client:
        first = await client.post(CHAT, json=chat(Q), headers=KEY_A)
        given = await client.post(FEEDBACK, json={"request_id": first.headers["x-request-id"], "good": True},
                                  headers=KEY_A)  # fmt: skip
        assert given.json()["entry_deleted"] is False and given.json()["tier"] == "upstream"
        assert (await client.post(CHAT, json=chat(Q), headers=KEY_A)).headers["x-cache"] == "HIT-EXACT"


async def test_a_bad_semantic_hit_tightens_the_threshold_under_max_error(make_client: Any) -> None:
    async with make_client(cache_threshold=0.8, cache_max_error=0.05) as client:
        await client.post(CHAT, json=chat(Q), headers=KEY_A)
        hit = await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
        similarity = float(hit.headers["x-cache-similarity"])
        given = await client.post(FEEDBACK, json={"request_id": hit.headers["x-request-id"], "good": False},
                                  headers=KEY_A)  # fmt: skip
        decision = given.json()["threshold"]
        assert decision["reason"] == "tightened" and decision["previous"] == 0.8
        assert similarity < decision["threshold"] <= 1.0
        config = (await client.get("/admin/config", headers=ADMIN_HEADERS)).json()
        assert config["namespace_thresholds"] == {"default": decision["threshold"]}
        (audit,) = (await client.get("/admin/audit", headers=ADMIN_HEADERS)).json()["data"]  # learning is audited
        assert audit["who"] == "learning" and audit["changed"] == {
            "namespace_thresholds": {"old": {}, "new": {"default": decision["threshold"]}}
        }
        learning = (await client.get("/admin/learning", headers=ADMIN_HEADERS)).json()
        scope = learning["scopes"]["semantic/cosine/default"]
        assert scope["labels"] == 1 and scope["bad"] == 1 and scope["decision"]["threshold"] == decision["threshold"]
        found = await scrape(client)
        assert value(found, "cachecade_learned_threshold", scope="semantic/cosine/default") == decision["threshold"]
        assert value(found, "cachecade_threshold_changes_total", direction="tightened") == 1
        # The question asked again is stored again, and the paraphrase no longer reaches it.
        await client.post(CHAT, json=chat(Q), headers=KEY_A)
        assert (await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)).headers["x-cache"] == "MISS"
        # Another namespace keeps the configured threshold.
        other = {"cache": {"namespace": "other"}}
        await client.post(CHAT, json=chat(Q, **other), headers=KEY_A)
        hit_other = await client.post(CHAT, json=chat(PARAPHRASE, **other), headers=KEY_A)
        assert hit_other.headers["x-cache"] == "HIT-SEMANTIC"


async def test_feedback_and_learned_thresholds_reach_every_replica(make_replica: Any) -> None:
    async with make_replica("a", cache_threshold=0.8, cache_max_error=0.05) as a, \
            make_replica("b", cache_threshold=0.8, cache_max_error=0.05) as b:  # fmt: skip
        await a.post(CHAT, json=chat(Q), headers=KEY_A)
        hit = await a.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
        assert hit.headers["x-cache"] == "HIT-SEMANTIC"
        given = await b.post(FEEDBACK, json={"request_id": hit.headers["x-request-id"], "good": False},
                             headers=KEY_A)  # fmt: skip
        assert given.status_code == 200, given.text
        learned = given.json()["threshold"]["threshold"]

        async def a_learned() -> bool:
            config = (await a.get("/admin/config", headers=ADMIN_HEADERS)).json()
            return bool(config["namespace_thresholds"].get("default") == learned)

        await eventually(a_learned, within=5.0)
        labels = (await a.get("/admin/learning", headers=ADMIN_HEADERS)).json()["scopes"]
        assert labels["semantic/cosine/default"]["bad"] == 1  # the label is in the shared store


async def test_shadow_checks_label_hits_and_stop_at_their_caps(make_client: Any, upstream: FakeUpstream) -> None:
    """Every semantic hit sampled, at most half of the upstream calls: the first hit is asked again (without our
    fields, not streamed) and the upstream's other answer is a bad label that tightens the threshold; the next
    hit is over the share cap and not asked."""
    settings = {"cache_threshold": 0.8, "cache_max_error": 0.05, "cache_shadow_share": 1.0,
                "cache_shadow_max_share": 0.5}  # fmt: skip
    async with make_client(**settings) as client:
        await client.post(CHAT, json=chat(Q), headers=KEY_A)  # upstream call 1
        upstream.answer = "Rome is the capital of Italy."  # what the upstream says now differs from the cache
        hit = await client.post(CHAT, json=chat(PARAPHRASE, cache={"namespace": "default"}, stream=True),
                                headers=KEY_A)  # fmt: skip
        assert hit.headers["x-cache"] == "HIT-SEMANTIC" and "Paris" in hit.text  # the cached answer, replayed
        assert len(upstream.requests) == 2  # the shadow call, after the response
        shadow = upstream.bodies()[1]
        assert "cache" not in shadow and "stream" not in shadow and shadow["messages"][0]["content"] == PARAPHRASE
        learning = (await client.get("/admin/learning", headers=ADMIN_HEADERS)).json()
        scope = learning["scopes"]["semantic/cosine/default"]
        assert scope["recent"][0]["source"] == "shadow" and scope["recent"][0]["good"] is False
        assert scope["decision"]["reason"] == "tightened"
        assert learning["stats"]["shadow"] == {"checks": 1, "agreed": 0, "disagreed": 1, "capped": 0, "errors": 0,
                                               "tokens": 18}  # fmt: skip
        # A shadow label does not delete the entry: the question asked again is an exact hit.
        assert (await client.post(CHAT, json=chat(Q), headers=KEY_A)).headers["x-cache"] == "HIT-EXACT"
        # Another semantic hit (below the tightened threshold no more: loosen the namespace by hand) is capped.
        put = await client.put("/admin/config", headers=ADMIN_HEADERS, json={"namespace_thresholds": {}})
        assert put.status_code == 200
        again = await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
        assert again.headers["x-cache"] == "HIT-SEMANTIC"
        stats = (await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()["learning"]["shadow"]
    assert stats["checks"] == 1 and stats["capped"] == 1 and len(upstream.requests) == 2


async def test_shadow_checks_stop_at_the_daily_token_cap(make_client: Any, upstream: FakeUpstream) -> None:
    settings = {"cache_threshold": 0.8, "cache_shadow_share": 1.0, "cache_shadow_max_share": 1.0,
                "cache_shadow_daily_tokens": 10}  # fmt: skip
    async with make_client(**settings) as client:
        await client.post(CHAT, json=chat(Q), headers=KEY_A)
        for _ in range(3):
            hit = await client.post(CHAT, json=chat(PARAPHRASE), headers=KEY_A)
            assert hit.headers["x-cache"] == "HIT-SEMANTIC"
        shadow = (await client.get("/admin/stats", headers=ADMIN_HEADERS)).json()["learning"]["shadow"]
    # The first check spent 18 tokens (the fake upstream's usage), past the cap of 10: no more that day.
    assert shadow["checks"] == 1 and shadow["agreed"] == 1 and shadow["capped"] == 2 and shadow["tokens"] == 18
    assert len(upstream.requests) == 2
