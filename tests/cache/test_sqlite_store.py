"""The embedded SQLite entry store, on a real file in a temporary directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cache.errors import StoreError
from cache.sqlite_store import SQLiteStore
from cache.store import Entry

RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Ünïcode ✓\nok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
}


def entry(vid: int, **over: Any) -> Entry:
    fields: dict[str, Any] = {
        "vid": vid, "tenant": "t", "namespace": "n", "kind": "chat", "model": "m", "partition": "p",
        "exact_key": f"k{vid}", "response": RESPONSE, "tier": "upstream", "created_at": float(vid),
        "expires_at": None, "text": f"question {vid}", "vector": np.full(4, vid / 10, dtype=np.float32),
        "embedder_id": "emb", "prompt_tokens": 3, "completion_tokens": 4,
    }  # fmt: skip
    fields.update(over)
    return Entry(**fields)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = await SQLiteStore.open(tmp_path / "x.sqlite3")
    yield s
    await s.close()


async def test_round_trip(store: SQLiteStore) -> None:
    original = entry(7, expires_at=100.0)
    result = await store.put(original, None)
    assert result.replaced == [] and result.evicted == []
    for got in (await store.get(7), await store.get_exact("k7", now=50.0)):
        assert got is not None
        assert got.response == RESPONSE
        assert got.vector is not None and got.vector.dtype == np.float32
        np.testing.assert_array_equal(got.vector, original.vector)
        assert (got.vid, got.tenant, got.namespace, got.kind, got.model, got.partition, got.exact_key) == (
            7, "t", "n", "chat", "m", "p", "k7",
        )  # fmt: skip
        assert (got.created_at, got.expires_at, got.text, got.embedder_id) == (7.0, 100.0, "question 7", "emb")
        assert (got.prompt_tokens, got.completion_tokens, got.tier) == (3, 4, "upstream")
    assert await store.get(8) is None
    assert await store.get_exact("nope", now=0.0) is None


async def test_entry_without_vector(store: SQLiteStore) -> None:
    await store.put(entry(1, vector=None, text=None), None)
    got = await store.get(1)
    assert got is not None and got.vector is None and got.text is None
    assert [v async for v in store.iter_vectors("emb")] == []


async def test_expired_not_served_and_purged(store: SQLiteStore) -> None:
    await store.put(entry(1, expires_at=10.0), None)
    await store.put(entry(2, expires_at=20.0), None)
    await store.put(entry(3), None)
    assert await store.get_exact("k1", now=9.99) is not None
    assert await store.get_exact("k1", now=10.0) is None
    assert await store.get_exact("k3", now=1e12) is not None
    assert await store.purge_expired(now=15.0) == [1]
    assert await store.count() == 2
    assert await store.get(1) is None
    assert sorted(await store.purge_expired(now=1e12)) == [2]
    assert await store.count() == 1


async def test_same_exact_key_replaces(store: SQLiteStore) -> None:
    await store.put(entry(1, exact_key="same"), None)
    result = await store.put(entry(2, exact_key="same", response={"v": 2}), None)
    assert result.replaced == [1]
    assert result.evicted == []
    assert await store.count() == 1
    assert await store.get(1) is None
    got = await store.get_exact("same", now=0.0)
    assert got is not None and got.vid == 2 and got.response == {"v": 2}


async def test_lru_eviction_uses_touch(store: SQLiteStore) -> None:
    for vid in (1, 2, 3):
        await store.put(entry(vid), max_entries=3)  # last_access = created_at = vid
    await store.touch({1: 10.0})  # 1 is now the most recently used; 2 is the least
    result = await store.put(entry(4), max_entries=3)
    assert result.evicted == [2]
    assert await store.get(2) is None
    assert await store.count() == 3
    await store.touch({3: 11.0})
    result = await store.put(entry(5, created_at=12.0), max_entries=2)
    assert sorted(result.evicted) == [1, 4]  # last_access 10.0 and 4.0; 3 (11.0) and 5 (12.0) stay
    assert sorted(e.vid for e in await store.list_entries(tenant=None, namespace=None, limit=10)) == [3, 5]


async def test_delete_and_delete_where(store: SQLiteStore) -> None:
    await store.put(entry(1, tenant="a", namespace="x"), None)
    await store.put(entry(2, tenant="a", namespace="y"), None)
    await store.put(entry(3, tenant="b", namespace="x"), None)
    await store.put(entry(4, tenant="b", namespace="y"), None)
    await store.put(entry(5, tenant="c", namespace="z"), None)
    assert await store.delete([1, 99]) == [1]
    assert await store.delete([1]) == []
    assert sorted(await store.delete_where(tenant=None, namespace="y")) == [2, 4]
    assert await store.delete_where(tenant="b", namespace="z") == []
    assert await store.delete_where(tenant="b", namespace=None) == [3]
    assert await store.count() == 1
    assert await store.flush() == 1
    assert await store.count() == 0
    assert await store.flush() == 0


async def test_list_entries_filters_and_order(store: SQLiteStore) -> None:
    await store.put(entry(1, tenant="a", namespace="x"), None)
    await store.put(entry(2, tenant="a", namespace="y"), None)
    await store.put(entry(3, tenant="b", namespace="x"), None)
    await store.put(entry(4, tenant="a", namespace="x"), None)

    async def vids(**kw: Any) -> list[int]:
        return [e.vid for e in await store.list_entries(**kw)]

    assert await vids(tenant=None, namespace=None, limit=10) == [4, 3, 2, 1]  # newest first
    assert await vids(tenant=None, namespace=None, limit=2) == [4, 3]
    assert await vids(tenant="a", namespace=None, limit=10) == [4, 2, 1]
    assert await vids(tenant=None, namespace="x", limit=10) == [4, 3, 1]
    assert await vids(tenant="a", namespace="x", limit=10) == [4, 1]
    assert await vids(tenant="zz", namespace=None, limit=10) == []


async def test_iter_vectors_by_embedder(store: SQLiteStore) -> None:
    await store.put(entry(3, partition="p1"), None)
    await store.put(entry(1, partition="p2"), None)
    await store.put(entry(2, embedder_id="other"), None)
    await store.put(entry(4, vector=None), None)
    items = [v async for v in store.iter_vectors("emb")]
    assert [(v.vid, v.partition) for v in items] == [(1, "p2"), (3, "p1")]
    np.testing.assert_array_equal(items[1].vector, np.full(4, 0.3, dtype=np.float32))
    assert [v.vid async for v in store.iter_vectors("other")] == [2]
    assert [v async for v in store.iter_vectors("missing")] == []


async def test_large_vids_round_trip(store: SQLiteStore) -> None:
    big = 2**63 - 1
    await store.put(entry(big, exact_key="big"), None)
    got = await store.get(big)
    assert got is not None and got.id == "7fffffffffffffff"
    assert [v.vid async for v in store.iter_vectors("emb")] == [big]


async def test_persists_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.sqlite3"
    first = await SQLiteStore.open(path)
    await first.put(entry(1), None)
    await first.put(entry(2, expires_at=50.0), None)
    await first.close()
    with pytest.raises(StoreError):
        _ = first.db
    second = await SQLiteStore.open(path)
    try:
        await second.ping()
        assert await second.count() == 2
        got = await second.get_exact("k2", now=1.0)
        assert got is not None and got.response == RESPONSE and got.expires_at == 50.0
        assert [v.vid async for v in second.iter_vectors("emb")] == [1, 2]
    finally:
        await second.close()
