"""The admin API: token, config at run time, stats, deletion, flush."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.proxy.conftest import ADMIN, chat

AUTH = {"authorization": f"Bearer {ADMIN}"}


async def test_admin_disabled_without_token(make_client) -> None:  # type: ignore[no-untyped-def]
    async with make_client(admin_token=None) as client:
        r = await client.get("/admin/stats", headers=AUTH)
    assert r.status_code == 404 and "CACHECADE_ADMIN_TOKEN" in r.json()["error"]["message"]


async def test_wrong_or_missing_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/admin/config")).status_code == 401
    assert (await client.get("/admin/config", headers={"authorization": "Bearer nope"})).status_code == 401


async def test_threshold_change_takes_effect_at_once(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("What is the capital of France?"))
    paraphrase = chat("What's the capital city of France?")
    r = await client.put("/admin/config", json={"threshold": 0.999}, headers=AUTH)
    assert r.status_code == 200 and r.json()["threshold"] == 0.999
    assert (await client.post("/v1/chat/completions", json=paraphrase)).headers["x-cache"] == "MISS"
    await client.put("/admin/config", json={"model_thresholds": {"up-model": 0.8}}, headers=AUTH)
    assert (await client.post("/v1/chat/completions", json=chat("Which city is France's capital?"))
            ).headers["x-cache"] == "HIT-SEMANTIC"  # fmt: skip
    config = (await client.get("/admin/config", headers=AUTH)).json()
    assert config["threshold"] == 0.999 and config["model_thresholds"] == {"up-model": 0.8}


async def test_bad_config_is_rejected_and_changes_nothing(client: httpx.AsyncClient) -> None:
    before = (await client.get("/admin/config", headers=AUTH)).json()
    r = await client.put("/admin/config", json={"threshold": 1.5}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "threshold"
    r = await client.put("/admin/config", json={"thresold": 0.9}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "thresold"
    r = await client.put("/admin/config", json={"namespace_thresholds": {"a": 7}}, headers=AUTH)
    assert r.status_code == 400
    raw = b'{"ttl_s": 1e400}'  # infinity: Python's json reads it so
    r = await client.put("/admin/config", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ttl_s"
    assert (await client.get("/admin/config", headers=AUTH)).json() == before


async def test_budget_policy_numbers_are_bounded(client: httpx.AsyncClient) -> None:
    """A clamp factor of 1e300 once made every later request a 500 (an infinite cap; found by bench/fuzz.py): the
    policy's numbers are bounded where they are used as integers or multiplied."""
    before = (await client.get("/admin/budgets", headers=AUTH)).json()
    for field, bad in (("clamp_factor", 1e300), ("clamp_min_tokens", 2**31), ("default_max_tokens", 10**30)):
        r = await client.put("/admin/budgets", json={field: bad}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, field
    r = await client.put("/admin/budgets", json={"default": {"tokens_per_day": 2**63}}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "default.tokens_per_day"
    assert (await client.get("/admin/budgets", headers=AUTH)).json() == before
    assert (await client.post("/v1/chat/completions", json=chat("Still answered?"))).status_code == 200


async def test_stats_count_tiers_and_tokens(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=chat("What is the capital of France?"))
    await client.post("/v1/chat/completions", json=chat("What is the capital of France?"))
    await client.post("/v1/chat/completions", json=chat("hi", temperature=2.0))
    stats = (await client.get("/admin/stats", headers=AUTH)).json()
    assert stats["misses"] == 1 and stats["hits_exact"] == 1 and stats["bypassed"] == 1
    assert stats["hit_rate"] == 0.5 and stats["entries"] == 1 and stats["tokens_saved"] == 18


async def test_delete_by_id_and_namespace_and_flush(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/chat/completions", json=chat("one", cache={"namespace": "a"}))
    await client.post("/v1/chat/completions", json=chat("two", cache={"namespace": "b"}))
    await client.post("/v1/chat/completions", json=chat("three", cache={"namespace": "b"}))
    entry_id = first.headers["x-cache-entry-id"]
    listed = (await client.get("/admin/entries", params={"namespace": "a"}, headers=AUTH)).json()["data"]
    assert [e["id"] for e in listed] == [entry_id]
    assert (await client.delete(f"/admin/entries/{entry_id}", headers=AUTH)).json() == {"deleted": 1}
    assert (await client.delete(f"/admin/entries/{entry_id}", headers=AUTH)).status_code == 404
    assert (await client.delete("/admin/entries/not-an-id", headers=AUTH)).json()["error"]["param"] == "entry_id"
    again = await client.post("/v1/chat/completions", json=chat("one", cache={"namespace": "a"}))
    assert again.headers["x-cache"] == "MISS"
    assert (await client.delete("/admin/entries", params={"namespace": "b"}, headers=AUTH)).json() == {"deleted": 2}
    assert (await client.delete("/admin/entries", headers=AUTH)).status_code == 400
    refused = await client.post("/admin/flush", json={}, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "confirm"
    assert (await client.post("/admin/flush", json={"confirm": "flush"}, headers=AUTH)).json() == {"deleted": 1}
    assert (await client.get("/admin/stats", headers=AUTH)).json()["entries"] == 0


async def test_changes_are_audited_and_last_across_a_restart_until_the_settings_change(make_client: Any) -> None:
    auth = AUTH
    async with make_client() as client:
        before = (await client.get("/admin/config", headers=auth)).json()["threshold"]
        assert (await client.put("/admin/config", json={"threshold": 0.97}, headers=auth)).status_code == 200
        assert (await client.get("/admin/audit", headers=auth)).status_code == 200
        audit = (await client.get("/admin/audit", headers=auth)).json()["data"]
        assert (await client.get("/admin/audit")).status_code == 401
    (record,) = audit
    assert record["policy"] == "cache" and record["changed"] == {"threshold": {"old": before, "new": 0.97}}
    assert record["who"].startswith("admin:") and ADMIN not in json.dumps(audit) and record["at"] > 0
    async with make_client() as client:  # a restart with the same settings: the change stands
        assert (await client.get("/admin/config", headers=auth)).json()["threshold"] == 0.97
        assert len((await client.get("/admin/audit", headers=auth)).json()["data"]) == 1
    async with make_client(cache_threshold=0.9) as client:  # other settings since: they win
        assert (await client.get("/admin/config", headers=auth)).json()["threshold"] == 0.9
