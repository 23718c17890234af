"""Replicas sharing one Redis: two apps in one process (each with its own index and follower) over a real
redis-server, and a MockTransport upstream."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from local_models.processes import free_port, stop
from tests.proxy.conftest import ADMIN, FakeUpstream, chat

ADMIN_HEADERS = {"authorization": f"Bearer {ADMIN}"}
Q = "How many legs does a spider have?"
PARAPHRASE = "What number of legs does a spider have?"


async def eventually(check: Any, within: float = 1.0) -> float:
    """Poll an async check until it is true; returns the seconds it took (fails after `within`)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, "not visible in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_an_answer_stored_through_one_replica_is_a_hit_through_the_other(make_replica, upstream) -> None:  # type: ignore[no-untyped-def]
    async with make_replica("a") as a, make_replica("b") as b:
        first = await a.post("/v1/chat/completions", json=chat(Q))
        assert first.headers["x-cache"] == "MISS"

        async def semantic_hit_on_b() -> bool:
            r = await b.post("/v1/chat/completions", json=chat(PARAPHRASE), headers={"cache-control": "no-store"})
            return r.headers["x-cache"] == "HIT-SEMANTIC"

        await eventually(semantic_hit_on_b)  # B's index learnt A's vector from the stream
        exact = await b.post("/v1/chat/completions", json=chat(Q))
        assert exact.headers["x-cache"] == "HIT-EXACT" and exact.json()["choices"] == first.json()["choices"]
        entry_id = first.headers["x-cache-entry-id"]
        deleted = await a.delete(f"/admin/entries/{entry_id}", headers=ADMIN_HEADERS)
        assert deleted.json() == {"deleted": 1}
        gone = await b.post("/v1/chat/completions", json=chat(PARAPHRASE), headers={"cache-control": "no-store"})
        assert gone.headers["x-cache"] == "MISS"
    assert len(upstream.requests) == 2


async def test_policy_changes_reach_every_replica(make_replica) -> None:  # type: ignore[no-untyped-def]
    async with make_replica("a") as a, make_replica("b") as b:
        put = await a.put("/admin/config", json={"threshold": 0.97}, headers=ADMIN_HEADERS)
        assert put.status_code == 200
        key = "k-" + "c" * 24
        await a.put("/admin/budgets", json={"keys": {key: {"tokens_per_day": 7}}}, headers=ADMIN_HEADERS)

        async def b_has_both() -> bool:
            config = (await b.get("/admin/config", headers=ADMIN_HEADERS)).json()
            budgets = (await b.get("/admin/budgets", headers=ADMIN_HEADERS)).json()
            return config["threshold"] == 0.97 and budgets["keys"].get(key, {}).get("tokens_per_day") == 7

        await eventually(b_has_both)


async def test_budgets_are_shared_between_replicas(make_replica) -> None:  # type: ignore[no-untyped-def]
    limits = {"default_key_tokens_per_day": 40}
    async with make_replica("a", **limits) as a, make_replica("b", **limits) as b:
        key = {"authorization": "Bearer sk-shared-budget-0123"}
        one = await a.post("/v1/chat/completions", json=chat("q1?", max_tokens=5), headers=key)
        two = await b.post("/v1/chat/completions", json=chat("q2?", max_tokens=5), headers=key)
        assert one.headers["x-ratelimit-remaining-tokens"] == "22"  # 40 - 18 (the upstream's usage)
        assert two.headers["x-ratelimit-remaining-tokens"] == "4"  # B counts what A spent
        refused = await a.post("/v1/chat/completions", json=chat("q3?", max_tokens=5), headers=key)
        assert refused.status_code == 429


async def test_unreachable_redis_fails_open(make_replica, upstream) -> None:  # type: ignore[no-untyped-def]
    dead = f"redis://127.0.0.1:{free_port()}/0"
    async with make_replica("a", redis_url=dead, default_key_tokens_per_day=10) as a:
        for question in (Q, Q, PARAPHRASE):
            r = await a.post("/v1/chat/completions", json=chat(question), headers={"authorization": "Bearer sk-x"})
            assert r.status_code == 200 and r.headers["x-served-by"] == "upstream:up-model"
            assert "x-ratelimit-limit-tokens" not in r.headers  # unmetered, not refused
        ready = await a.get("/readyz")
        assert ready.status_code == 200 and ready.json()["store"].startswith("unavailable")
    assert len(upstream.requests) == 3  # nothing could be cached, nothing failed


async def test_store_failing_between_lookup_and_answer_fails_open(make_client, upstream, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Redis can go away mid-request: after the lookup, the estimate's neighbours and the single-flight re-lookup
    must fail open too."""
    from cache.errors import StoreError
    from cache.response_cache import ResponseCache

    async def gone(*args: Any, **kwargs: Any) -> Any:
        raise StoreError("Redis: connection reset")

    monkeypatch.setattr(ResponseCache, "neighbours", gone)
    monkeypatch.setattr(ResponseCache, "lookup_again", gone)
    async with make_client() as client:
        await client.post("/v1/chat/completions", json=chat(Q))
        r = await client.post("/v1/chat/completions", json=chat("How far away is the Moon?"))
        assert r.status_code == 200 and r.headers["x-token-estimate-source"] == "prompt"
        upstream_answers = await asyncio.gather(*(client.post("/v1/chat/completions", json=chat("Same one?"))
                                              for _ in range(3)))  # fmt: skip
    assert all(a.status_code == 200 for a in upstream_answers)


async def test_a_store_down_at_shutdown_does_not_fail_the_shutdown(make_replica, caplog) -> None:  # type: ignore[no-untyped-def]
    """The last LRU touches cannot be written while Redis is unavailable: logged, and the app still stops."""
    async with make_replica("a") as a:
        await a.post("/v1/chat/completions", json=chat(Q))
        assert (await a.post("/v1/chat/completions", json=chat(Q))).headers["x-cache"] == "HIT-EXACT"  # a use
        services = a._transport.app.state.services  # type: ignore[attr-defined]
        services.cache.store.breaker.failed(ConnectionError("down"))  # Redis unavailable from here on
    assert "could not write the last uses" in caplog.text


async def test_redis_out_of_memory_fails_open(make_client, upstream, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Redis at its maxmemory with noeviction answers every write with an OOM error: requests still succeed (the
    answer is not stored, so the same question reaches the upstream again), and the log says why."""
    import redis.asyncio as redis

    from tests.redis_server import start_redis

    process, url = start_redis(tmp_path / "redis-oom.log")
    try:
        async with make_client(redis_url=url, cascade_routes={}) as client:
            admin = redis.Redis.from_url(url)
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")  # every write from now on: OOM
            answers = [await client.post("/v1/chat/completions", json=chat("What is the capital of France?"))
                       for _ in range(2)]  # fmt: skip
            await admin.config_set("maxmemory", "0")
            await admin.aclose()
        assert [a.status_code for a in answers] == [200, 200] and "Paris" in answers[1].text
        assert len(upstream.requests) == 2  # nothing was stored: both reached the upstream
        assert "OutOfMemoryError: command not allowed when used memory > 'maxmemory'" in caplog.text
    finally:
        stop(process)


async def test_a_full_disk_fails_open(make_client, upstream: FakeUpstream, caplog) -> None:  # type: ignore[no-untyped-def]
    """The embedded store on a full disk (SQLite's own SQLITE_FULL, made by capping the file at its current size):
    every request still succeeds, answers are simply not stored, the log says why; once there is room again,
    answers are stored and served as before. bench/hardening.py does the same on a real tmpfs that fills up."""
    upstream.answer = "A long answer. " * 40  # ~600 bytes a row: the last page fills after a few
    async with make_client(cascade_routes={}) as client:
        writer = client._transport.app.state.services.cache.store._writer  # type: ignore[attr-defined]

        def cap(pages: int | None) -> None:
            db = writer.db
            limit = db.execute("PRAGMA page_count").fetchone()[0] if pages is None else pages
            db.execute(f"PRAGMA max_page_count = {limit}")

        await writer.run(cap, None)
        full = [await client.post("/v1/chat/completions", json=chat(f"Question {i} on a full disk?"))
                for i in range(20)]  # fmt: skip
        again = await client.post("/v1/chat/completions", json=chat("Question 19 on a full disk?"))
        await writer.run(cap, 1_073_741_823)  # room again
        stored = await client.post("/v1/chat/completions", json=chat("A question with room to store it?"))
        hit = await client.post("/v1/chat/completions", json=chat("A question with room to store it?"))
    assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] for r in full)
    assert "x-cache-entry-id" not in full[-1].headers and again.headers["x-cache"] == "MISS"
    assert "could not store answer" in caplog.text and "database or disk is full" in caplog.text
    assert caplog.text.count("could not store answer") == 1  # one line a minute, not one a request
    assert "x-cache-entry-id" in stored.headers and hit.headers["x-cache"] == "HIT-EXACT"
