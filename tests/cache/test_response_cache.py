"""The response cache over a real SQLite store, a real FAISS index and the real packaged embedder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cache.embedder import AsyncEmbedder
from cache.index import VectorIndex
from cache.keys import CacheKey, chat_key
from cache.policy import CachePolicy
from cache.response_cache import Lookup, ResponseCache
from cache.sqlite_store import SQLiteStore

Q = "How can I learn Python quickly?"
PARAPHRASE = "What is the fastest way to learn Python?"
UNRELATED = "What is the capital of France?"

Factory = Callable[..., Awaitable[ResponseCache]]


def key(text: str, tenant: str = "t", namespace: str = "n") -> CacheKey:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    return chat_key(body, tenant, namespace)


def answer(content: str = "Practice daily.", completion_tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": completion_tokens, "total_tokens": 11 + completion_tokens},
    }  # fmt: skip


@pytest.fixture
def clock() -> list[float]:
    return [1000.0]


@pytest.fixture
async def make_cache(tmp_path: Path, embedder: Any, clock: list[float]) -> AsyncIterator[Factory]:
    stores: list[SQLiteStore] = []
    embedders: list[AsyncEmbedder] = []

    async def make(name: str = "cache.sqlite3", **policy: Any) -> ResponseCache:
        store = await SQLiteStore.open(tmp_path / name)
        stores.append(store)
        async_embedder = AsyncEmbedder(embedder)
        embedders.append(async_embedder)
        index = VectorIndex(embedder.dim)
        return ResponseCache(store, index, async_embedder, CachePolicy(**policy), clock=lambda: clock[0])

    yield make
    for s in stores:
        await s.close()
    for e in embedders:
        e.close()


def similarity(embedder: Any, a: str, b: str) -> float:
    va, vb = embedder.encode([a, b])
    return float(va @ vb)


async def test_exact_hit_after_put(make_cache: Factory) -> None:
    cache = await make_cache()
    miss, query_vector = await cache.lookup(key(Q), Lookup())
    assert miss is None and query_vector is not None  # a miss still returns the query vector
    stored = await cache.put(key(Q), answer(), None, tier="upstream")
    assert stored.vid in cache.index
    hit, vector = await cache.lookup(key(Q), Lookup())
    assert hit is not None and hit.tier == "exact" and hit.similarity == 1.0
    assert vector is None  # no embedding on an exact hit
    assert hit.entry.vid == stored.vid
    assert hit.entry.response == answer()
    assert (hit.entry.prompt_tokens, hit.entry.completion_tokens) == (11, 7)
    assert hit.entry.expires_at == 1000.0 + CachePolicy().ttl_s


async def test_semantic_hit_for_paraphrase(make_cache: Factory, embedder: Any) -> None:
    expected = similarity(embedder, Q, PARAPHRASE)
    assert 0.8 < expected < 0.99
    cache = await make_cache(threshold=0.8)
    _, vector = await cache.lookup(key(Q), Lookup())
    assert vector is not None and vector.shape == (embedder.dim,)
    await cache.put(key(Q), answer(), vector, tier="upstream")
    hit, _ = await cache.lookup(key(PARAPHRASE), Lookup())
    assert hit is not None and hit.tier == "semantic"
    assert hit.similarity == pytest.approx(expected, abs=1e-4)
    assert hit.entry.text == Q
    miss, _ = await cache.lookup(key(UNRELATED), Lookup())
    assert miss is None


async def test_default_threshold_rejects_paraphrase(make_cache: Factory) -> None:
    cache = await make_cache()  # 0.95
    await cache.put(key(Q), answer(), None, tier="upstream")
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is None
    assert (await cache.lookup(key(PARAPHRASE), Lookup(threshold=0.5)))[0] is None  # a request cannot loosen it


async def test_other_tenant_and_namespace_miss(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8)
    await cache.put(key(Q), answer(), None, tier="upstream")
    assert (await cache.lookup(key(Q, tenant="t2"), Lookup()))[0] is None
    assert (await cache.lookup(key(Q, namespace="n2"), Lookup()))[0] is None
    assert (await cache.lookup(key(Q), Lookup()))[0] is not None


async def test_max_tokens_smaller_than_stored_misses(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8)
    await cache.put(key(Q), answer(completion_tokens=7), None, tier="upstream")
    for text in (Q, PARAPHRASE):
        assert (await cache.lookup(key(text), Lookup(max_tokens=6)))[0] is None
        assert (await cache.lookup(key(text), Lookup(max_tokens=7)))[0] is not None


async def test_max_age(make_cache: Factory, clock: list[float]) -> None:
    cache = await make_cache()
    await cache.put(key(Q), answer(), None, tier="upstream")
    assert (await cache.lookup(key(Q), Lookup(max_age=0)))[0] is not None  # age 0 is not older than 0
    clock[0] += 1.0
    assert (await cache.lookup(key(Q), Lookup(max_age=0)))[0] is None
    assert (await cache.lookup(key(Q), Lookup(max_age=1.0)))[0] is not None


async def test_ttl_expiry(make_cache: Factory, clock: list[float]) -> None:
    cache = await make_cache(threshold=0.8, ttl_s=60.0)
    stored = await cache.put(key(Q), answer(), None, tier="upstream")
    assert stored.expires_at == 1060.0
    clock[0] = 1059.9
    assert (await cache.lookup(key(Q), Lookup()))[0] is not None
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is not None
    clock[0] = 1060.0
    assert (await cache.lookup(key(Q), Lookup()))[0] is None
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is None
    assert await cache.purge_expired() == 1
    assert stored.vid not in cache.index and cache.stats.expired == 1


async def test_request_threshold_stricter_than_similarity(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8)
    await cache.put(key(Q), answer(), None, tier="upstream")
    assert (await cache.lookup(key(PARAPHRASE), Lookup(threshold=0.99)))[0] is None
    hit, _ = await cache.lookup(key(Q), Lookup(threshold=0.99))
    assert hit is not None and hit.tier == "exact"


async def test_stale_index_id_dropped(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8)
    stored = await cache.put(key(Q), answer(), None, tier="upstream")
    assert await cache.store.delete([stored.vid]) == [stored.vid]  # behind the cache's back
    assert stored.vid in cache.index
    hit, _ = await cache.lookup(key(PARAPHRASE), Lookup())
    assert hit is None
    assert cache.stats.stale_index_ids == 1
    assert stored.vid not in cache.index


async def test_rebuild_index_over_same_store(make_cache: Factory, clock: list[float]) -> None:
    first = await make_cache("shared.sqlite3", threshold=0.8, ttl_s=100.0)
    await first.put(key(Q), answer(), None, tier="upstream")
    await first.put(key(UNRELATED), answer("Paris."), None, tier="upstream", ttl_s=10.0)
    await first.store.close()
    clock[0] += 50.0  # the second entry has expired
    second = await make_cache("shared.sqlite3", threshold=0.8)
    assert len(second.index) == 0
    assert (await second.lookup(key(PARAPHRASE), Lookup()))[0] is None
    assert await second.rebuild_index() == 1
    assert second.stats.expired == 1
    hit, _ = await second.lookup(key(PARAPHRASE), Lookup())
    assert hit is not None and hit.tier == "semantic" and hit.entry.text == Q


async def test_replacement_follows_in_index(make_cache: Factory) -> None:
    cache = await make_cache()
    old = await cache.put(key(Q), answer("old"), None, tier="upstream")
    new = await cache.put(key(Q), answer("new"), None, tier="upstream")
    assert old.vid not in cache.index and new.vid in cache.index and len(cache.index) == 1
    hit, _ = await cache.lookup(key(Q), Lookup())
    assert hit is not None and hit.entry.response["choices"][0]["message"]["content"] == "new"


async def test_eviction_removes_vector(make_cache: Factory, clock: list[float]) -> None:
    cache = await make_cache(max_entries=2, threshold=0.8)
    entries = []
    for text in (Q, UNRELATED, "How do I bake sourdough bread?"):
        clock[0] += 1.0
        entries.append(await cache.put(key(text), answer(), None, tier="upstream"))
    assert entries[0].vid not in cache.index
    assert [e.vid in cache.index for e in entries[1:]] == [True, True]
    assert await cache.store.count() == 2 and len(cache.index) == 2
    assert cache.stats.evicted == 1 and cache.stats.stored == 3
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is None
    assert cache.stats.stale_index_ids == 0


async def test_put_never_evicts_itself(make_cache: Factory, clock: list[float]) -> None:
    cache = await make_cache(max_entries=1)
    await cache.put(key(Q), answer(), None, tier="upstream")
    clock[0] -= 5.0  # wall clock stepped back (NTP)
    newest = await cache.put(key(UNRELATED), answer("Paris."), None, tier="upstream")
    in_store = await cache.store.get(newest.vid) is not None
    assert (newest.vid in cache.index) == in_store
    assert in_store


async def test_stats(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8)
    await cache.put(key(Q), answer(completion_tokens=7), None, tier="upstream")
    assert (await cache.lookup(key(Q), Lookup()))[0] is not None
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is not None
    assert (await cache.lookup(key(UNRELATED), Lookup()))[0] is None
    s = cache.stats
    assert (s.hits_exact, s.hits_semantic, s.misses, s.stored) == (1, 1, 1, 1)
    assert s.tokens_saved == 2 * (11 + 7)
    assert s.as_dict()["hit_rate"] == pytest.approx(2 / 3)


async def test_semantic_disabled_and_exact_disabled(make_cache: Factory) -> None:
    cache = await make_cache(threshold=0.8, semantic_enabled=False)
    await cache.put(key(Q), answer(), None, tier="upstream")
    assert (await cache.lookup(key(PARAPHRASE), Lookup()))[0] is None
    cache.policy = CachePolicy(threshold=0.8, exact_enabled=False)
    hit, _ = await cache.lookup(key(Q), Lookup())
    assert hit is not None and hit.tier == "semantic" and hit.similarity == pytest.approx(1.0, abs=1e-5)


class ScriptedVerifier:
    """Scores pairs from a table of cached questions, and records the batches it was asked."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores
        self.batches: list[list[str]] = []

    async def score(self, pairs: list[tuple[str, str]]) -> Any:
        import numpy as np

        self.batches.append([cached for _, cached in pairs])
        return np.array([self.scores[cached] for _, cached in pairs])


@pytest.mark.parametrize(("scores", "served", "batches"), [
    ({"How can I learn Python quickly?": 0.9, "How can I learn Python fast?": 0.9, "How to learn Python?": 0.9},
     "How can I learn Python quickly?", [1]),  # the nearest accepted: one pair scored, no more
    ({"How can I learn Python quickly?": 0.1, "How can I learn Python fast?": 0.2, "How to learn Python?": 0.8},
     "How to learn Python?", [1, 2]),  # the nearest rejected: the rest in one batch, the best accepted served
    ({"How can I learn Python quickly?": 0.1, "How can I learn Python fast?": 0.2, "How to learn Python?": 0.3},
     None, [1, 2]),
])  # fmt: skip
async def test_verified_lookup_scores_the_nearest_first(make_cache: Factory, embedder: Any, scores: dict[str, float],
                                                        served: str | None, batches: list[int]) -> None:  # fmt: skip
    cache = await make_cache(verifier_band_low=0.5, verifier_threshold=0.5)
    cache.verifier = ScriptedVerifier(scores)  # type: ignore[assignment]
    for text in scores:
        await cache.put(key(text), answer(), None, tier="upstream")
    query = "How could I learn Python quickly?"  # nearest to the first, in no canonical form of it
    request = Lookup()
    hit, _ = await cache.lookup(key(query), request)
    nearest = max(scores, key=lambda t: similarity(embedder, query, t))
    assert nearest == "How can I learn Python quickly?"
    assert [len(b) for b in cache.verifier.batches] == batches  # type: ignore[attr-defined]
    assert cache.verifier.batches[0] == [nearest]  # type: ignore[attr-defined]
    assert (hit.entry.text if hit else None) == served
    assert request.verdict.decision == ("accept" if served else "reject") and request.verdict.ms is not None
