"""GET /metrics: the services' counters and the request histograms, in Prometheus' text format."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cache.index import VectorIndex
from cache.labels import Decision
from cache.response_cache import CacheStats
from local_models.cascade import CascadePolicy
from proxy.app import create_app
from proxy.cascade import Cascade, CascadeStats
from proxy.config import Settings
from proxy.learning import LearningStats
from proxy.metrics import Metrics, metrics_of
from proxy.spending import TokenStats
from tests.proxy.conftest import FakeUpstream, chat

CHAT = "/v1/chat/completions"
Sample = tuple[str, dict[str, str], float]


def samples(text: str) -> list[Sample]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample with this name whose labels include `labels` (None: no such sample)."""
    matching = [v for n, sample_labels, v in found if n == name and labels.items() <= sample_labels.items()]
    assert len(matching) <= 1, f"{name} {labels}: {len(matching)} samples"
    return matching[0] if matching else None


async def scrape(client: httpx.AsyncClient) -> list[Sample]:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return samples(r.text)


async def test_a_miss_then_a_hit(make_client: Any) -> None:
    async with make_client() as client:
        assert (await client.post(CHAT, json=chat("What is the capital of France?"))).headers["x-cache"] == "MISS"
        hit = await client.post(CHAT, json=chat("What is the capital of France?"))
        assert hit.headers["x-cache"] == "HIT-EXACT"
        found = await scrape(client)
    assert value(found, "cachecade_cache_lookups_total", result="miss") == 1
    assert value(found, "cachecade_cache_lookups_total", result="hit_exact") == 1
    assert value(found, "cachecade_cache_lookups_total", result="hit_semantic") == 0
    assert value(found, "cachecade_cache_stored_total") == 1
    assert value(found, "cachecade_cache_index_vectors") == 1
    assert value(found, "cachecade_cache_index_builds") == 0
    assert value(found, "cachecade_tokens_total", kind="saved_by_cache") == 18  # the stored answer's usage
    assert value(found, "cachecade_tokens_total", kind="upstream_completion") == 7
    route = {"route": CHAT}
    assert value(found, "cachecade_request_seconds_count", served_by="cache", cache="hit-exact", **route) == 1
    assert value(found, "cachecade_request_seconds_count", served_by="upstream", cache="miss", **route) == 1
    assert value(found, "cachecade_response_end_seconds_count", served_by="cache", **route) == 1
    assert value(found, "cachecade_request_seconds_bucket", served_by="cache", le="60.0") == 1
    assert value(found, "cachecade_upstream_errors_total") is None  # no errors yet: no sample
    assert value(found, "cachecade_redis_errors_total") is None  # not on Redis


def refuse(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


async def test_streams_and_upstream_errors(make_client: Any, upstream: FakeUpstream) -> None:
    async with make_client() as client:
        async with client.stream("POST", CHAT, json=chat("Stream me", stream=True)) as r:
            assert [line async for line in r.aiter_lines() if line][-1] == "data: [DONE]"
        upstream.handler = refuse
        down = await client.post(CHAT, json=chat("Is the upstream up?"))
        assert down.status_code == 502
        assert (await client.post(CHAT, json={"model": "m"})).status_code == 400  # before the pipeline
        found = await scrape(client)
    assert value(found, "cachecade_response_end_seconds_count", served_by="upstream", cache="miss", route=CHAT) == 2
    assert value(found, "cachecade_upstream_errors_total", status="502") == 1
    assert value(found, "cachecade_request_seconds_count", served_by="unset", cache="unset") == 1
    assert value(found, "cachecade_budget_counter_errors_total") == 0


async def test_redis_store_and_follower(make_replica: Any) -> None:
    async with make_replica("a") as client:
        await client.post(CHAT, json=chat("What is the capital of France?"))
        found = await scrape(client)
    assert value(found, "cachecade_redis_errors_total") == 0
    assert value(found, "cachecade_redis_available") == 1
    assert value(found, "cachecade_follower_errors_total") == 0
    assert value(found, "cachecade_cache_stored_total") == 1


def test_cascade_and_token_counters_are_read_at_scrape_time() -> None:
    cascade = CascadeStats(served=Counter({"smollm2": 3}), escalated=Counter({"smollm2:low-confidence": 2}))
    tokens = TokenStats(local_prompt=10, local_completion=5, local_spent=40, clamped=1)
    cache = SimpleNamespace(stats=CacheStats(bypassed=4), index=VectorIndex(4), store=object())
    local = Cascade({}, CascadePolicy(routes={}), off={"gemma3": "llama.cpp died with SIGILL"})
    local.stats = cascade
    learning = LearningStats(labels={"good": 5, "bad": 2}, entries_deleted=2)
    learning.changes["tightened"] = 1
    decision = Decision(0.93, 0.87, 40, 0, 0.072, "tightened")
    learner = SimpleNamespace(stats=learning, decisions={"semantic/verifier/default": decision})
    svc = SimpleNamespace(cache=cache, cascade=local, follower=None, learner=learner,
                          spending=SimpleNamespace(stats=tokens, budgets=SimpleNamespace(errors=2)))  # fmt: skip
    metrics = Metrics(lambda: svc)  # type: ignore[arg-type, return-value]
    cascade.escalated["gemma3:length"] += 1  # after registration: counters are read when scraped
    found = samples(metrics.render().decode())
    assert value(found, "cachecade_local_answers_total", tier="smollm2") == 3
    assert value(found, "cachecade_escalations_total", tier="smollm2", reason="low-confidence") == 2
    assert value(found, "cachecade_escalations_total", tier="gemma3", reason="length") == 1
    assert value(found, "cachecade_tokens_total", kind="local_completion") == 5
    assert value(found, "cachecade_local_tokens_spent_total") == 40
    assert value(found, "cachecade_budget_clamped_requests_total") == 1
    assert value(found, "cachecade_budget_counter_errors_total") == 2
    assert value(found, "cachecade_cache_lookups_total", result="bypass") == 4
    assert value(found, "cachecade_local_model_up", tier="gemma3") == 0
    assert value(found, "cachecade_feedback_labels_total", good="false") == 2
    assert value(found, "cachecade_feedback_entries_deleted_total") == 2
    assert value(found, "cachecade_threshold_changes_total", direction="tightened") == 1
    assert value(found, "cachecade_learned_threshold", scope="semantic/verifier/default") == 0.93
    assert value(found, "cachecade_learned_error_bound", scope="semantic/verifier/default") == 0.072


async def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    first, second = (create_app(Settings(data_dir=tmp_path, cascade_routes={})) for _ in range(2))
    metrics_of(first).upstream_errors.labels("504").inc()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second), base_url="http://t") as client:
        found = await scrape(client)  # not started: only the request metrics, and none of the other app's
    assert value(found, "cachecade_upstream_errors_total", status="504") is None
    assert value(samples(metrics_of(first).render().decode()), "cachecade_upstream_errors_total", status="504") == 1


async def test_event_loop_lag_and_process_metrics(make_client: Any) -> None:
    """The event loop's lag is observed every 0.25 s (a step that holds the loop shows in it), next to the process'
    resident memory and open file descriptors (bench/soak.py reads all three)."""
    async with make_client() as client:
        await asyncio.sleep(0.6)
        time.sleep(0.3)  # holds the event loop on purpose
        await asyncio.sleep(0.3)
        found = await scrape(client)
    lag = {le: value(found, "cachecade_event_loop_lag_seconds_bucket", le=le) or 0.0 for le in ("0.1", "0.5")}
    assert (value(found, "cachecade_event_loop_lag_seconds_count") or 0) >= 2
    assert lag["0.1"] < lag["0.5"]  # the 0.3 s hold: an observation above 0.1 s
    assert (value(found, "process_resident_memory_bytes") or 0) > 50e6
    assert (value(found, "process_open_fds") or 0) > 3
