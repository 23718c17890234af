"""The EntryStore contract, run on each store: SQLite on a real file in a temporary directory, and Redis on the
session's redis-server. Times are real (T0 is when this module was imported) because RedisStore sets EXPIREAT at
an entry's absolute expiry: an entry dated in the past would vanish from Redis at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache.errors import StoreError
from cache.sqlite_store import SQLiteStore
from cache.store import Entry, EntryStore
from proxy.router import Router

T0 = time.time()
HOUR = 3600.0
RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Ünïcode ✓\nok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def entry(vid: int, **over: Any) -> Entry:
    """Entry `vid`, created `vid` seconds after T0 (so a later vid is newer and more recently used)."""
    fields: dict[str, Any] = {
        "vid": vid, "tenant": "t", "namespace": "n", "kind": "chat", "model": "m", "partition": "p",
        "exact_key": f"k{vid}", "response": RESPONSE, "tier": "upstream", "created_at": T0 + min(vid, 1000),
        "expires_at": None, "text": f"question {vid}", "vector": np.full(4, vid / 10, dtype=np.float32),
        "embedder_id": "emb", "prompt_tokens": 3, "completion_tokens": 4,
    }  # fmt: skip
    fields.update(over)
    return Entry(**fields)


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = await SQLiteStore.open(tmp_path / "x.sqlite3")
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> EntryStore:
    """Each store in turn: `sqlite_store` above, `redis_store` from conftest.py (a prefix of its own)."""
    got: EntryStore = request.getfixturevalue(f"{request.param}_store")
    return got


async def test_round_trip(store: EntryStore) -> None:
    original = entry(7, expires_at=T0 + HOUR)
    result = await store.put(original, None)
    assert result.replaced == [] and result.evicted == []
    for got in (await store.get(7), await store.get_exact("k7", now=T0 + 50)):
        assert got is not None
        assert got.response == RESPONSE
        assert got.vector is not None and got.vector.dtype == np.float32
        np.testing.assert_allclose(got.vector, original.vector, rtol=2**-11)  # Redis keeps float16
        assert (got.vid, got.tenant, got.namespace, got.kind, got.model, got.partition, got.exact_key) == (
            7, "t", "n", "chat", "m", "p", "k7",
        )  # fmt: skip
        assert (got.created_at, got.expires_at, got.text, got.embedder_id) == (T0 + 7, T0 + HOUR, "question 7", "emb")
        assert (got.prompt_tokens, got.completion_tokens, got.tier) == (3, 4, "upstream")
    assert await store.get_exact("k7", now=T0 + HOUR) is None  # past its TTL, though the store still holds it
    assert await store.get(8) is None
    assert await store.get_exact("nope", now=T0) is None


async def test_entry_without_vector(store: EntryStore) -> None:
    await store.put(entry(1, vector=None, text=None), None)
    got = await store.get(1)
    assert got is not None and got.vector is None and got.text is None
    assert [v async for v in store.iter_vectors("emb")] == []


async def test_expired_not_served_and_purged(store: EntryStore) -> None:
    now = time.time()
    await store.put(entry(1, expires_at=now - 10), None)  # already past: Redis drops it at once
    await store.put(entry(2, expires_at=now + HOUR), None)
    await store.put(entry(3), None)
    assert await store.get_exact("k2", now=now + HOUR - 0.01) is not None
    assert await store.get_exact("k2", now=now + HOUR) is None
    assert await store.get_exact("k1", now=now) is None
    assert await store.get_exact("k3", now=1e12) is not None
    assert await store.purge_expired(now=time.time()) == [1]
    assert await store.count() == 2
    assert await store.get(1) is None
    assert await store.purge_expired(now=time.time()) == []


async def test_same_exact_key_replaces(store: EntryStore) -> None:
    await store.put(entry(1, exact_key="same"), None)
    result = await store.put(entry(2, exact_key="same", response={"v": 2}), None)
    assert result.replaced == [1]
    assert result.evicted == []
    assert await store.count() == 1
    assert await store.get(1) is None
    got = await store.get_exact("same", now=T0)
    assert got is not None and got.vid == 2 and got.response == {"v": 2}


async def test_same_entry_again_replaces_nothing(store: EntryStore) -> None:
    await store.put(entry(1, exact_key="same"), None)
    assert (await store.put(entry(2, exact_key="same"), None)).replaced == [1]
    assert (await store.put(entry(2, exact_key="same"), None)).replaced == []  # the same entry again
    got = await store.get_exact("same", now=T0)
    assert got is not None and got.vid == 2
    assert await store.count() == 1


async def test_lru_eviction_uses_touch(store: EntryStore) -> None:
    for vid in (1, 2, 3):
        await store.put(entry(vid), max_entries=3)  # last use = created_at = T0 + vid
    await store.touch({1: T0 + 10})  # 1 is now the most recently used; 2 is the least
    result = await store.put(entry(4), max_entries=3)
    assert result.evicted == [2]
    assert await store.get(2) is None
    assert await store.count() == 3
    await store.touch({3: T0 + 11, 2: T0 + 11})  # 2 is gone: ignored
    result = await store.put(entry(5, created_at=T0 + 12), max_entries=2)
    assert sorted(result.evicted) == [1, 4]  # last use T0+10 and T0+4; 3 (T0+11) and 5 (T0+12) stay
    assert sorted(e.vid for e in await store.list_entries(tenant=None, namespace=None, limit=10)) == [3, 5]
    assert await store.count() == 2


async def test_delete_and_delete_where(store: EntryStore) -> None:
    for vid, tenant, namespace in [(1, "a", "x"), (2, "a", "y"), (3, "b", "x"), (4, "b", "y"), (5, "c", "z")]:
        await store.put(entry(vid, tenant=tenant, namespace=namespace), None)
    assert await store.delete([1, 99]) == [1]
    assert await store.delete([1]) == []
    assert await store.get_exact("k1", now=T0) is None
    assert sorted(await store.delete_where(tenant=None, namespace="y")) == [2, 4]
    assert await store.delete_where(tenant="b", namespace="z") == []
    assert await store.delete_where(tenant="b", namespace=None) == [3]
    assert await store.count() == 1
    assert await store.flush() == 1
    assert await store.count() == 0
    assert await store.flush() == 0


async def test_list_entries_filters_and_order(store: EntryStore) -> None:
    for vid, tenant, namespace in [(1, "a", "x"), (2, "a", "y"), (3, "b", "x"), (4, "a", "x")]:
        await store.put(entry(vid, tenant=tenant, namespace=namespace), None)

    async def vids(**kw: Any) -> list[int]:
        return [e.vid for e in await store.list_entries(**kw)]

    assert await vids(tenant=None, namespace=None, limit=10) == [4, 3, 2, 1]  # newest first
    assert await vids(tenant=None, namespace=None, limit=2) == [4, 3]
    assert await vids(tenant="a", namespace=None, limit=10) == [4, 2, 1]
    assert await vids(tenant=None, namespace="x", limit=10) == [4, 3, 1]
    assert await vids(tenant="a", namespace="x", limit=10) == [4, 1]
    assert await vids(tenant="zz", namespace=None, limit=10) == []


async def test_iter_vectors_by_embedder(store: EntryStore) -> None:
    await store.put(entry(3, partition="p1"), None)
    await store.put(entry(1, partition="p2"), None)
    await store.put(entry(2, embedder_id="other"), None)
    await store.put(entry(4, vector=None), None)
    items = sorted([v async for v in store.iter_vectors("emb")], key=lambda v: v.vid)  # Redis: in SCAN order
    assert [(v.vid, v.partition) for v in items] == [(1, "p2"), (3, "p1")]
    np.testing.assert_allclose(items[1].vector, np.full(4, 0.3, dtype=np.float32), rtol=2**-11)
    assert [v.vid async for v in store.iter_vectors("other")] == [2]
    assert [v async for v in store.iter_vectors("missing")] == []


async def test_large_vids_round_trip(store: EntryStore) -> None:
    big = 2**63 - 1
    await store.put(entry(big, exact_key="big"), None)
    got = await store.get(big)
    assert got is not None and got.id == "7fffffffffffffff" and got.vid == big
    assert [v.vid async for v in store.iter_vectors("emb")] == [big]
    assert await store.delete([big]) == [big]


async def test_nan_in_response_is_a_store_error(store: EntryStore) -> None:
    for bad in (float("nan"), float("inf")):
        with pytest.raises(StoreError):
            await store.put(entry(1, response={"choices": [{"logprob": bad}]}), None)
    assert await store.count() == 0
    assert await store.get(1) is None


async def test_served_records_and_labels(store: EntryStore) -> None:
    """What answered a request is found by its tenant only, until it expires; one label per request; labels are
    kept newest first, the newest `keep` per scope."""
    from cache.labels import Label, Served

    served = Served("req-1", "k-a", "n", "m", "semantic", "00ab", "semantic/verifier/n/m", 0.93, T0)
    await store.remember(served, T0 + HOUR)
    await store.remember(Served("req-2", "k-a", "n", "m", "exact", None, None, None, T0), time.time() + 0.05)
    assert await store.recall("k-a", "req-1", time.time()) == served
    assert await store.recall("k-b", "req-1", time.time()) is None  # another key's request id
    assert await store.recall("k-a", "nope", time.time()) is None
    time.sleep(0.1)
    assert await store.recall("k-a", "req-2", time.time()) is None  # forgotten when it expires
    assert await store.claim_label("k-a", "req-1") and not await store.claim_label("k-a", "req-1")
    for i in range(5):
        await store.add_label(Label("s1", 0.9 + i / 100, i % 2 == 0, "feedback", T0 + i, f"r{i}"), keep=3)
    await store.add_label(Label("s2", 0.5, False, "shadow", T0), keep=3)
    got = await store.labels("s1", 10)
    assert [label.request_id for label in got] == ["r4", "r3", "r2"]
    assert got[0] == Label("s1", 0.9 + 4 / 100, True, "feedback", T0 + 4, "r4")
    assert [label.request_id for label in await store.labels("s1", 2)] == ["r4", "r3"]
    assert await store.label_scopes() == ["s1", "s2"]


async def test_route_samples_log(store: EntryStore) -> None:
    """The router's log: appended, read from a cursor (exclusive), oldest first, trimmed to about `keep`."""
    assert await store.route_samples("", 10) == []
    await store.add_route_samples([f"s{i}" for i in range(5)], keep=1000)
    rows = await store.route_samples("", 3)
    assert [s for _, s in rows] == ["s0", "s1", "s2"]
    assert [s for _, s in await store.route_samples(rows[-1][0], 10)] == ["s3", "s4"]
    await store.add_route_samples([f"t{i}" for i in range(300)], keep=100)
    kept = await store.route_samples("", 1000)
    assert 100 <= len(kept) <= 305 and kept[-1][1] == "t299"  # Redis trims approximately (whole nodes)


def unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


async def test_the_memory_is_shared_through_the_store(store: EntryStore) -> None:
    """Two replicas on one store: what one learns (answers, then a label), the other reads back; a restarted
    replica starts from the log; a replica never counts its own samples twice."""
    a, b = Router(min_tries=3, explore=0.0, store=store), Router(min_tries=3, explore=0.0, store=store)
    for i in range(3):
        a.record("t", unit(1, 0, 0.01 * i), score=0.9, complete=True, request_id=f"r{i}")
    await a.sync()
    await b.sync()
    assert b.tiers["t"].count == 3 and not b.skip("t", 0.7, unit(1, 0.1, 0))
    for i in range(3):
        a.label("t", f"r{i}", right=False)
    await a.sync()
    await b.sync()
    assert b.skip("t", 0.7, unit(1, 0.1, 0))  # a's labels reached b
    await a.sync()
    assert a.tiers["t"].count == 3  # its own samples, read back, are not added again
    restarted = Router(min_tries=3, explore=0.0, store=store)
    await restarted.sync()
    assert restarted.tiers["t"].count == 3 and restarted.skip("t", 0.7, unit(1, 0.1, 0))
    assert restarted.summary()["tiers"]["t"] == {"remembered": 3, "labelled_right": 0, "labelled_wrong": 3}


async def test_runtime_policies_and_the_audit_log(store: EntryStore) -> None:
    assert await store.load_policy("cache") is None and await store.audit(10) == []
    await store.save_policy("cache", '{"v": 1}')
    await store.save_policy("cache", '{"v": 2}')
    assert await store.load_policy("cache") == '{"v": 2}' and await store.load_policy("budgets") is None
    for i in range(5):
        await store.append_audit(f"r{i}", keep=3)
    assert await store.audit(10) == ["r4", "r3", "r2"]  # newest first, the newest `keep` kept
    assert await store.audit(1) == ["r4"]


async def test_stored_responses_per_key_with_expiry(store: EntryStore) -> None:
    """The Responses API's stored responses: per API key (another key's id is not found), until their expiry,
    deletable."""
    record = '{"response": {"id": "resp_1"}, "messages": [{"role": "user", "content": "Ünïcode ✓"}]}'
    await store.save_responses([("k-a", "resp_1", record, time.time() + HOUR),
                                ("k-a", "resp_old", record, time.time() + 0.3)])  # fmt: skip
    assert await store.load_response("k-a", "resp_1", time.time()) == record
    assert await store.load_response("k-b", "resp_1", time.time()) is None
    assert await store.delete_response("k-b", "resp_1") is False
    time.sleep(0.4)
    assert await store.load_response("k-a", "resp_old", time.time()) is None
    assert await store.delete_response("k-a", "resp_1") is True
    assert await store.load_response("k-a", "resp_1", time.time()) is None
