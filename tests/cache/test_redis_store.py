"""What is Redis's own, on real servers: the session's redis-server, one of a test's own (stopped mid-test), and a
local 3-master Redis Cluster. Entries expire through EXPIREAT at their absolute TTL, so times here are real. The
EntryStore contract it shares with SQLite is in tests/cache/test_stores.py."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from cache import redis_store as redis_store_module
from cache.breaker import Breaker
from cache.counters import Count
from cache.errors import StoreError
from cache.redis_counters import RedisCounters
from cache.redis_store import Event, RedisStore
from cache.store import Entry
from local_models.processes import free_port, stop
from tests.cache.test_stores import HOUR, RESPONSE, T0, entry
from tests.redis_server import start_redis


def stream_id(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


async def events_after(store: RedisStore, after: str) -> list[Event]:
    return await store.read_events(after=after, block_ms=100)


async def wait_for_redis_expiry(expires_at: float) -> None:
    """EXPIREAT takes whole seconds and the store rounds up (int + 1): past that instant Redis has dropped it."""
    await asyncio.sleep(max(0.0, int(expires_at) + 1 - time.time()) + 0.1)


# --- where Redis goes beyond the EntryStore contract (tests/cache/test_stores.py) ----------------------------------


async def test_expired_entry_not_indexed(redis_store: RedisStore) -> None:
    await redis_store.put(entry(1), None)
    await redis_store.put(entry(5, expires_at=T0 - 1), None)  # past its TTL: not indexed
    assert [v.vid async for v in redis_store.iter_vectors("emb")] == [1]


async def test_entry_expired_by_redis(redis_store: RedisStore) -> None:
    expires_at = time.time() + 1
    await redis_store.put(entry(1, expires_at=expires_at), None)
    await redis_store.put(entry(2, expires_at=time.time() + HOUR), None)
    assert await redis_store.get(1) is not None
    after = await redis_store.last_event_id()
    await wait_for_redis_expiry(expires_at)
    assert await redis_store.get(1) is None
    assert await redis_store.get_exact("k1", now=time.time()) is None
    assert [v.vid async for v in redis_store.iter_vectors("emb")] == [2]
    assert await redis_store.count() == 2  # its id stays in the LRU set until purged
    assert await redis_store.purge_expired(time.time()) == [1]
    assert await redis_store.count() == 1
    assert [(e.op, e.vid, e.origin) for e in await events_after(redis_store, after)] == [
        ("delete", 1, redis_store.origin)
    ]
    assert await redis_store.purge_expired(time.time()) == []


async def test_unstorable_answer_is_not_announced(redis_store: RedisStore) -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(StoreError):
            await redis_store.put(entry(1, response={"choices": [{"logprob": bad}]}), None)
    assert await redis_store.last_event_id() == "0-0"


# --- the layout: small fields packed, vectors as float16, the earlier layout still read -----------------------------


def unit_vectors(n: int, dim: int = 384) -> np.ndarray:
    vectors = np.random.default_rng(7).standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


async def test_entry_is_four_fields_with_a_float16_vector(redis_store: RedisStore) -> None:
    vectors = unit_vectors(50)
    for vid, vector in enumerate(vectors, 1):
        await redis_store.put(entry(vid, vector=vector, expires_at=T0 + HOUR), None)
    await redis_store.put(entry(99, vector=None, text=None), None)
    assert set(await redis_store.client.hkeys(redis_store._e(1))) == {b"ix", b"meta", b"response", b"text"}
    assert set(await redis_store.client.hkeys(redis_store._e(99))) == {b"ix", b"meta", b"response"}
    got = {v.vid: v.vector async for v in redis_store.iter_vectors("emb")}
    assert sorted(got) == list(range(1, 51))
    stored = np.stack([got[vid] for vid in range(1, 51)])
    assert stored.dtype == np.float32 and stored.shape == (50, 384)
    cosines = np.sum(stored * vectors, axis=1) / np.linalg.norm(stored, axis=1)
    assert np.max(np.abs(1 - cosines)) < 1e-5  # float16 rounding: ~1e-6 on 384-d unit vectors
    one = await redis_store.get(1)
    assert one is not None and one.vector is not None
    np.testing.assert_array_equal(one.vector, got[1])


async def test_vector_float16_cannot_hold_is_kept_as_float32(redis_store: RedisStore) -> None:
    big = np.array([1e6, -3.0, 0.5, 7e4], dtype=np.float32)  # past float16's 65504: not a normalised embedding
    await redis_store.put(entry(1, vector=big), None)
    got = await redis_store.get(1)
    assert got is not None and got.vector is not None
    np.testing.assert_array_equal(got.vector, big)
    [indexed] = [v async for v in redis_store.iter_vectors("emb")]
    np.testing.assert_array_equal(indexed.vector, big)


async def test_same_id_again_leaves_no_field_behind(redis_store: RedisStore) -> None:
    await redis_store.put(entry(1, expires_at=T0 + HOUR), None)
    await redis_store.put(entry(1, vector=None, text=None), None)
    got = await redis_store.get(1)
    assert got is not None and (got.vector, got.text, got.expires_at) == (None, None, None)
    assert await redis_store.client.ttl(redis_store._e(1)) == -1


def old_layout(e: Entry) -> dict[str, Any]:
    """The hash of an entry as written before the fields were packed (a field each, vector float32, vid)."""
    fields: dict[str, Any] = {k: getattr(e, k) for k in ("tenant", "namespace", "kind", "model", "partition",
                                                          "exact_key", "tier", "embedder_id")}  # fmt: skip
    fields |= {"vid": format(e.vid, "016x"), "response": json.dumps(e.response), "created_at": repr(e.created_at),
               "expires_at": "" if e.expires_at is None else repr(e.expires_at), "prompt_tokens": e.prompt_tokens,
               "completion_tokens": e.completion_tokens, "text": "" if e.text is None else e.text}  # fmt: skip
    if e.vector is not None:
        fields["vector"] = np.asarray(e.vector, dtype=np.float32).tobytes()
    return fields


async def put_old_layout(store: RedisStore, e: Entry) -> None:
    """What a replica of the previous version wrote (a rolling upgrade shares one Redis)."""
    pipe = store.client.pipeline(transaction=False)
    pipe.hset(store._e(e.vid), mapping=old_layout(e))
    pipe.set(store._x(e.exact_key), format(e.vid, "016x"))
    pipe.zadd(store._lru, {format(e.vid, "016x"): e.created_at})
    await pipe.execute()


async def test_entries_of_the_earlier_layout_are_read(redis_store: RedisStore) -> None:
    store = redis_store
    old = entry(1, tenant="a", expires_at=T0 + HOUR, vector=np.full(4, 0.7, dtype=np.float32))
    await put_old_layout(store, old)
    await put_old_layout(store, entry(2, tenant="b", text=None, vector=None, embedder_id="other"))
    await store.put(entry(3, tenant="a"), None)
    for got in (await store.get(1), await store.get_exact("k1", now=T0)):
        assert got is not None
        assert (got.vid, got.tenant, got.namespace, got.kind, got.model, got.partition, got.exact_key, got.tier) == (
            1, "a", "n", "chat", "m", "p", "k1", "upstream",
        )  # fmt: skip
        assert (got.created_at, got.expires_at, got.text, got.embedder_id) == (T0 + 1, T0 + HOUR, "question 1", "emb")
        assert (got.response, got.prompt_tokens, got.completion_tokens) == (RESPONSE, 3, 4)
        assert got.vector is not None and got.vector.dtype == np.float32
        np.testing.assert_array_equal(got.vector, old.vector)  # float32, exactly as it was written
    two = await store.get(2)
    assert two is not None and (two.text, two.vector, two.expires_at, two.tenant) == (None, None, None, "b")
    indexed = {v.vid: v async for v in store.iter_vectors("emb")}
    assert sorted(indexed) == [1, 3]
    np.testing.assert_array_equal(indexed[1].vector, old.vector)
    assert await store.embedder_ids() == {"emb", "other"}
    assert [e.vid for e in await store.list_entries(tenant=None, namespace=None, limit=10)] == [3, 2, 1]
    assert sorted(await store.delete_where(tenant="a", namespace="n")) == [1, 3]
    assert await store.get_exact("k1", now=T0) is None
    assert await store.client.exists(store._x("k1")) == 0  # its exact key went with it
    assert await store.delete([2]) == [2]
    assert await store.count() == 0


# --- bulk reads: ids from the LRU set, entries read in batches ------------------------------------------------------


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 7 entries, 3 in flight, ZSCAN pages of 50: a few hundred entries cross every boundary."""
    monkeypatch.setattr(redis_store_module, "BATCH", 7)
    monkeypatch.setattr(redis_store_module, "PARALLEL", 3)
    monkeypatch.setattr(redis_store_module, "ID_PAGE", 50)


@pytest.fixture(params=["redis_store", "cluster_store"])
def either_store(request: pytest.FixtureRequest) -> RedisStore:
    """Redis (entries read by a Lua script per batch), then Redis Cluster (by a pipeline per batch)."""
    store: RedisStore = request.getfixturevalue(request.param)
    return store


async def test_bulk_reads_cross_batches(either_store: RedisStore, small_batches: None) -> None:
    store = either_store
    vids = list(range(1, 301))  # past 128 members the LRU set is a skiplist: ZSCAN then returns it in pages
    for vid in vids:
        await store.put(entry(vid, embedder_id="other" if vid % 10 == 0 else "emb", expires_at=T0 + HOUR), None)
    indexed = [v.vid async for v in store.iter_vectors("emb")]
    assert sorted(indexed) == [v for v in vids if v % 10] and len(indexed) == len(set(indexed))
    gone = [5, 77, 150, 299]
    for vid in gone:  # as Redis does when an entry expires
        await store.client.delete(store._e(vid))
    assert sorted(await store.purge_expired(time.time())) == gone
    assert await store.count() == len(vids) - len(gone)
    others = [v for v in vids if v % 10 == 0 and v not in gone]
    assert sorted([v.vid async for v in store.iter_vectors("other")]) == others


async def test_delete_and_flush_cross_batches(either_store: RedisStore, small_batches: None) -> None:
    store = either_store
    for vid in range(1, 41):
        await store.put(entry(vid, exact_key=f"k{vid}"), None)
    assert sorted(await store.delete([*range(1, 21), 999])) == list(range(1, 21))  # 3 batches of 7
    assert await store.get_exact("k3", T0) is None and await store.client.exists(store._x("k3")) == 0
    assert (await store.get_exact("k33", T0)) is not None
    assert await store.flush() == 20
    assert await store.count() == 0 and await store.client.exists(store._x("k33")) == 0


async def test_flush_drops_the_ids_of_entries_redis_expired(redis_store: RedisStore) -> None:
    for vid in (1, 2, 3):
        await redis_store.put(entry(vid), None)
    await redis_store.client.delete(redis_store._e(2))  # as Redis does when an entry expires: its id stays in lru
    assert await redis_store.flush() == 2
    assert await redis_store.count() == 0


async def test_rebuild_stopped_early_leaves_no_read_in_flight(redis_store: RedisStore, small_batches: None) -> None:
    for vid in range(1, 60):
        await redis_store.put(entry(vid), None)
    vectors = redis_store.iter_vectors("emb")
    assert isinstance(vectors, AsyncGenerator)
    assert (await anext(vectors)).vid > 0
    await vectors.aclose()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_failed_batch_is_one_store_error(redis_store: RedisStore, small_batches: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    for vid in range(1, 60):
        await redis_store.put(entry(vid), None)
    each = redis_store._each

    async def fail_after_two(command: str, vids: list[int], args: Any) -> list[Any]:
        calls.append(vids)
        if len(calls) > 2:
            raise RedisConnectionError("connection lost mid-rebuild")
        return await each(command, vids, args)

    calls: list[list[int]] = []
    monkeypatch.setattr(redis_store, "_each", fail_after_two)
    with pytest.raises(StoreError, match="connection lost"):
        await _collect(redis_store.iter_vectors("emb"))
    assert redis_store.errors == 1 and not redis_store.available  # one failure, however many batches were in flight
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --- events ---------------------------------------------------------------------------------------------------------


async def test_put_delete_flush_and_policy_events(redis_store: RedisStore) -> None:
    assert await redis_store.last_event_id() == "0-0"
    assert await events_after(redis_store, "0-0") == []
    await redis_store.put(entry(5, partition="p9", embedder_id="e1"), None)
    [put] = await events_after(redis_store, "0-0")
    assert (put.op, put.origin, put.vid, put.partition, put.embedder_id) == ("put", redis_store.origin, 5, "p9", "e1")
    assert put.vector is not None and put.vector.dtype == np.float32
    np.testing.assert_array_equal(put.vector, np.full(4, 0.5, dtype=np.float32))
    assert await redis_store.last_event_id() == put.id

    await redis_store.put(entry(6, vector=None), None)
    await redis_store.put(entry(7, exact_key="k6"), None)  # replaces 6
    await redis_store.delete([5])
    await redis_store.flush()  # deletes 7
    await redis_store.publish_policy("cascade", {"enabled": True, "models": ["a", "ü"]})
    events = await events_after(redis_store, put.id)
    assert [(e.op, e.vid) for e in events] == [
        ("put", 6), ("put", 7), ("delete", 6), ("delete", 5), ("delete", 7), ("flush", 0), ("policy", 0),
    ]  # fmt: skip
    assert all(e.origin == redis_store.origin for e in events)
    assert events[0].vector is None
    assert (events[-1].name, events[-1].policy) == ("cascade", {"enabled": True, "models": ["a", "ü"]})
    ids = [put.id] + [e.id for e in events]
    assert [stream_id(i) for i in ids] == sorted({stream_id(i) for i in ids})  # strictly increasing
    assert await redis_store.last_event_id() == events[-1].id
    assert await redis_store.first_event_id() == put.id
    assert await events_after(redis_store, events[-1].id) == []


async def test_events_carry_the_origin_of_their_writer(redis_store: RedisStore, redis_url: str) -> None:
    other = RedisStore.from_url(redis_url, prefix=redis_store.prefix)
    try:
        await other.put(entry(1), None)
        [event] = await events_after(redis_store, "0-0")
        assert event.origin == other.origin != redis_store.origin
        assert await redis_store.get(1) is not None  # one store, seen from both
    finally:
        await other.close()


# --- failures: always StoreError, and fast while Redis is down ------------------------------------------------------


async def test_unreachable_fails_fast_then_retries() -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix="test:")
    try:
        with pytest.raises(StoreError):
            await store.get(1)
        assert store.errors == 1 and not store.available
        started = time.perf_counter()
        with pytest.raises(StoreError, match="unavailable"):
            await store.get(1)
        assert time.perf_counter() - started < 0.05
        assert store.errors == 1  # no network call was made
        await asyncio.sleep(0.3)  # past the first backoff (0.25 s)
        assert store.available
        with pytest.raises(StoreError):
            await store.put(entry(1), None)
        assert store.errors == 2 and not store.available
    finally:
        await store.close()


async def test_server_stopped_mid_test_raises_store_error(tmp_path: Path) -> None:
    process, url = start_redis(tmp_path / "redis.log")
    store = RedisStore.from_url(url, prefix="test:")
    try:
        await store.put(entry(1), None)
        assert [v.vid async for v in store.iter_vectors("emb")] == [1]
        stop(process)
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "get": lambda: store.get(1),
            "put": lambda: store.put(entry(2), None),
            "get_exact": lambda: store.get_exact("k1", now=T0),
            "delete": lambda: store.delete([1]),
            "iter_vectors": lambda: _collect(store.iter_vectors("emb")),
            "count": lambda: store.count(),
        }
        for fresh_breaker in (True, False):  # through the network, then failing fast
            raised = {}
            for name, call in calls.items():
                if fresh_breaker:
                    store.breaker = Breaker()
                try:
                    await call()
                    raised[name] = "nothing"
                except Exception as exc:
                    raised[name] = type(exc).__name__
            assert raised == dict.fromkeys(calls, "StoreError")
    finally:
        await store.close()
        stop(process)


async def _collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


# --- Redis Cluster --------------------------------------------------------------------------------------------------


@pytest.fixture
async def cluster_store(redis_cluster_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_cluster_url, cluster=True, prefix=f"test-{uuid.uuid4().hex}:")
    yield store
    await store.close()


async def test_cluster_round_trip(cluster_store: RedisStore) -> None:
    store = cluster_store
    vids = [1, 2, 3, 4, 5, 6, 2**63 - 1]  # hash tags of their own: spread over the three masters
    for vid in vids:
        await store.put(entry(vid, expires_at=T0 + HOUR), None)
    assert await store.count() == len(vids)
    nodes = {store.client.get_node_from_key(f"{store.prefix}e:{{{vid:016x}}}").name for vid in vids}
    assert len(nodes) == 3  # so pipelines and SCAN cross masters
    got = await store.get(3)
    assert got is not None and got.response == RESPONSE and got.created_at == T0 + 3
    exact = await store.get_exact("k4", now=T0)
    assert exact is not None and exact.vid == 4
    assert sorted([v.vid async for v in store.iter_vectors("emb")]) == vids
    assert (await store.put(entry(8, exact_key="k1"), None)).replaced == [1]
    assert await store.delete([2, 99]) == [2]
    assert await store.get(2) is None and await store.get_exact("k2", now=T0) is None
    await store.client.delete(f"{store.prefix}e:{{{5:016x}}}")  # as Redis does when the entry expires or is evicted
    assert await store.purge_expired(time.time()) == [5]
    assert await store.count() == len(vids) - 2
    await store.publish_policy("cache", {"ttl_s": 60})
    events = await events_after(store, "0-0")
    assert [(e.op, e.vid) for e in events][-5:] == [("put", 8), ("delete", 1), ("delete", 2), ("delete", 5),
                                                   ("policy", 0)]  # fmt: skip
    assert events[0].vector is not None and events[-1].policy == {"ttl_s": 60}
    assert await store.last_event_id() == events[-1].id
    assert sorted(await store.delete_where(tenant="t", namespace=None)) == [3, 4, 6, 8, 2**63 - 1]
    assert await store.count() == 0


async def test_cluster_counters_with_one_hash_tag(redis_cluster_url: str) -> None:
    counters = RedisCounters(RedisCluster.from_url(redis_cluster_url), prefix=f"test-{uuid.uuid4().hex}:")
    later = time.time() + HOUR
    tokens, requests = "budget:{k-abc}:tokens:day:1", "budget:{k-abc}:requests:minute:1"
    try:
        assert await counters.add([Count(tokens, 30, 100, later), Count(requests, 1, 3, later)], check=True) == (
            True, [30, 1],
        )  # fmt: skip
        refused = await counters.add([Count(tokens, 80, 100, later), Count(requests, 1, 3, later)], check=True)
        assert refused == (False, [30, 1])  # the tokens limit refuses the whole add: requests is untouched
        adds = [counters.add([Count(tokens, 10, 100, later), Count(requests, 0, 3, later)], check=True)
                for _ in range(12)]  # fmt: skip
        results = await asyncio.gather(*adds)
        assert sum(ok for ok, _ in results) == 7  # 30 + 7 * 10 = 100: exactly seven fit
        assert await counters.get([tokens, requests, "budget:{k-abc}:none"]) == [100, 1, 0]
        other = "budget:{k-xyz}:tokens:day:1"  # another tag, likely another master
        assert await counters.add([Count(other, 5, None, later)], check=False) == (True, [5])
        assert await counters.get([other]) == [5]
    finally:
        await counters.close()
