"""The response cache: exact tier, then semantic tier, over one store (truth) and one vector index (follower)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from cache.embedder import AsyncEmbedder
from cache.index import VectorIndex
from cache.keys import CacheKey
from cache.policy import CachePolicy
from cache.store import Entry, EntryStore, new_vid
from cache.verifier import AsyncVerifier, canonical

log = logging.getLogger("cachecade.cache")


@dataclass
class Verdict:
    """What the verifier decided on a lookup: accept (a candidate served), reject (candidates, none served) or
    skipped (served above verifier_skip_above, unverified); its probability for the best candidate it read."""

    decision: Literal["accept", "reject", "skipped"] | None = None
    score: float | None = None
    ms: float | None = None  # time spent waiting for the model's scores (None: the model was not asked)


@dataclass(frozen=True)
class Lookup:
    """What the caller may ask of a lookup beyond the key (from Cache-Control and the body's `cache`)."""

    max_age: float | None = None  # seconds; older entries are not served
    max_tokens: int | None = None  # the caller's limit; longer stored answers are not served
    threshold: float | None = None  # a stricter per-request threshold
    verifier_threshold: float | None = None  # a stricter per-request verifier threshold
    verdict: Verdict = field(default_factory=Verdict)  # filled in by the lookup


@dataclass(frozen=True)
class Hit:
    """A served cache entry."""

    entry: Entry
    tier: Literal["exact", "semantic"]
    similarity: float


@dataclass(frozen=True)
class Neighbour:
    """A stored answer near a query: how close, and how many completion tokens it took."""

    similarity: float
    completion_tokens: int


@dataclass
class CacheStats:
    """Counters since start (per process)."""

    hits_exact: int = 0
    hits_semantic: int = 0
    misses: int = 0
    bypassed: int = 0
    stored: int = 0
    evicted: int = 0
    expired: int = 0
    stale_index_ids: int = 0  # ids the index had but the store did not (dropped on sight)
    too_long_for_semantic: int = 0  # lookups whose text is longer than the embedder reads
    tokens_saved: int = 0
    verifier_accepts: int = 0  # lookups served because the verifier accepted a candidate
    verifier_rejects: int = 0  # lookups whose candidates the verifier all rejected (misses)
    verifier_skips: int = 0  # hits above verifier_skip_above, served unverified
    verifier_errors: int = 0  # verifications that failed (those lookups missed)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        looked_up = self.hits_exact + self.hits_semantic + self.misses
        data["hit_rate"] = (self.hits_exact + self.hits_semantic) / looked_up if looked_up else 0.0
        return data


def _usage(response: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens as the upstream reported them; completion -1 when it reported none."""
    usage = response.get("usage") or {}
    completion = usage.get("completion_tokens")
    return int(usage.get("prompt_tokens") or 0), int(completion) if isinstance(completion, int) else -1


class ResponseCache:
    """Looks requests up (exact, then semantic) and stores admitted answers."""

    def __init__(
        self,
        store: EntryStore,
        index: VectorIndex,
        embedder: AsyncEmbedder | None,
        policy: CachePolicy,
        clock: Callable[[], float] = time.time,
        verifier: AsyncVerifier | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.embedder = embedder
        self.policy = policy
        self.verifier = verifier
        self.clock = clock
        self.stats = CacheStats()
        self._last_used: dict[int, float] = {}

    async def flush_uses(self) -> None:
        """Write the recorded uses to the store (LRU order); called every second and before an insert."""
        if self._last_used:
            last_used, self._last_used = self._last_used, {}
            await self.store.touch(last_used)

    async def rebuild_index(self, purge: bool = True) -> int:
        """Load every live vector of this embedder from the store into the index (at start). `purge` first drops
        expired entries from the store; a Redis replica skips it (its store does not return expired vectors, and a
        pass over 1M ids would delay the start by seconds): the minute's upkeep does it."""
        self.index.clear()
        if self.embedder is None:
            return 0
        if purge:
            self.stats.expired += len(await self.store.purge_expired(self.clock()))
        batches: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        async for item in self.store.iter_vectors(self.embedder.model_id):
            vids, vectors = batches.setdefault(item.partition, ([], []))
            vids.append(item.vid)
            vectors.append(item.vector)
        for partition, (vids, vectors) in batches.items():
            await self.index.load(partition, np.array(vids, dtype=np.int64), np.stack(vectors))
        return len(self.index)

    @property
    def verifying(self) -> bool:
        """Whether semantic candidates go through the verifier."""
        return self.verifier is not None and self.policy.verifier_enabled

    def threshold(self, key: CacheKey, request: Lookup) -> float:
        """The effective cosine threshold: configured (with the verifier on: its band's lower bound), tightened
        (never loosened) by the request."""
        if self.verifying:
            configured = self.policy.verifier_band_low
        else:
            configured = self.policy.threshold_for(key.model, key.namespace)
        return max(configured, request.threshold) if request.threshold is not None else configured

    def verifier_threshold(self, key: CacheKey, request: Lookup) -> float:
        """The effective verifier threshold (a probability): configured, tightened by the request."""
        configured = self.policy.verifier_threshold_for(key.model, key.namespace)
        given = request.verifier_threshold
        return max(configured, given) if given is not None else configured

    def _servable(self, entry: Entry, key: CacheKey, request: Lookup, now: float) -> bool:
        if entry.tenant != key.tenant or entry.namespace != key.namespace or entry.kind != key.kind:
            return False  # isolation is re-checked on the entry, not only trusted to the partition
        if entry.expired(now):
            return False
        if request.max_age is not None and entry.age(now) > request.max_age:
            return False
        # An answer of unknown length is served only to callers without a limit.
        return request.max_tokens is None or 0 <= entry.completion_tokens <= request.max_tokens

    async def lookup(self, key: CacheKey, request: Lookup) -> tuple[Hit | None, np.ndarray | None]:
        """Find a servable entry. Returns the hit (or None) and the query vector (reused when storing)."""
        now = self.clock()
        hit = await self._lookup_exact(key, request, now) if self.policy.exact_enabled else None
        vector = None
        if hit is None and self.policy.semantic_enabled and key.text is not None and self.embedder:
            vector = await self.embedder.embed(key.text)
            if vector is None:
                self.stats.too_long_for_semantic += 1  # served by the exact tier only
            else:
                hit = await self._lookup_semantic(key, request, vector, now)
        if hit is None:
            self.stats.misses += 1
            return None, vector
        self._served(hit, now)
        return hit, vector

    def _served(self, hit: Hit, now: float) -> None:
        """Count a hit and record the use (written in batches by flush_uses(), off the hit path)."""
        self._last_used[hit.entry.vid] = now
        self.stats.tokens_saved += hit.entry.tokens_saved
        if hit.tier == "exact":
            self.stats.hits_exact += 1
        else:
            self.stats.hits_semantic += 1

    async def lookup_again(self, key: CacheKey, request: Lookup) -> Hit | None:
        """After waiting for an identical request in flight: the answer it stored (exact tier). A hit here turns
        the miss this request was first counted as into a hit."""
        now = self.clock()
        hit = await self._lookup_exact(key, request, now) if self.policy.exact_enabled else None
        if hit is not None:
            self.stats.misses -= 1
            self._served(hit, now)
        return hit

    async def _lookup_exact(self, key: CacheKey, request: Lookup, now: float) -> Hit | None:
        entry = await self.store.get_exact(key.exact, now)
        if entry is None or entry.partition != key.partition or not self._servable(entry, key, request, now):
            return None
        return Hit(entry, "exact", 1.0)

    async def _lookup_semantic(self, key: CacheKey, request: Lookup, vector: np.ndarray, now: float) -> Hit | None:
        threshold = self.threshold(key, request)
        if self.verifying:
            return await self._lookup_verified(key, request, vector, now, threshold)
        for vid, score in self.index.search(key.partition, vector, self.policy.top_k):
            if score < threshold:
                break
            entry = await self._servable_entry(vid, key, request, now)
            if entry is not None:
                return Hit(entry, "semantic", score)
        return None

    async def _servable_entry(self, vid: int, key: CacheKey, request: Lookup, now: float) -> Entry | None:
        entry = await self.store.get(vid)
        if entry is None:  # evicted or deleted elsewhere: the store is the truth
            self.stats.stale_index_ids += self.index.remove([vid])
            return None
        return entry if entry.partition == key.partition and self._servable(entry, key, request, now) else None

    async def _lookup_verified(self, key: CacheKey, request: Lookup, vector: np.ndarray, now: float,
                               threshold: float) -> Hit | None:  # fmt: skip
        """The top-k candidates at or above the band, read concurrently and verified best-first (the nearest alone,
        then the rest in one batch); the best one (by cosine) that the verifier accepts is served."""
        assert self.verifier is not None and key.text is not None
        near = [(vid, score) for vid, score in self.index.search(key.partition, vector, self.policy.top_k)
                if score >= threshold]  # fmt: skip
        entries = await asyncio.gather(*(self._servable_entry(vid, key, request, now) for vid, _ in near))
        candidates = [(e, score) for e, (_, score) in zip(entries, near, strict=True) if e is not None and e.text]
        if not candidates:
            return None
        if candidates[0][1] >= self.policy.verifier_skip_above:
            request.verdict.decision = "skipped"
            self.stats.verifier_skips += 1
            return Hit(candidates[0][0], "semantic", candidates[0][1])
        mine = canonical(key.text)
        for entry, cosine in candidates:  # the same question in another form: no need to ask the model
            if canonical(str(entry.text)) == mine:
                request.verdict.decision, request.verdict.score = "accept", 1.0
                self.stats.verifier_accepts += 1
                return Hit(entry, "semantic", cosine)
        needed = self.verifier_threshold(key, request)
        started = time.perf_counter()
        try:
            # Best first: the nearest candidate alone (most lookups end there, at the price of one pair), then
            # the rest in one batch.
            for group in (candidates[:1], candidates[1:]):
                if not group:
                    break
                scores = await self.verifier.score([(key.text, str(e.text)) for e, _ in group])
                if request.verdict.score is None:
                    request.verdict.score = float(scores[0])
                for (entry, cosine), probability in zip(group, scores, strict=True):
                    if probability >= needed:
                        request.verdict.decision, request.verdict.score = "accept", float(probability)
                        self.stats.verifier_accepts += 1
                        return Hit(entry, "semantic", cosine)
        except Exception:  # a failed verification is a miss (never an unverified hit), and is counted
            self.stats.verifier_errors += 1
            log.exception("verifier failed; the lookup misses")
            return None
        finally:
            request.verdict.ms = (time.perf_counter() - started) * 1000
        request.verdict.decision = "reject"
        self.stats.verifier_rejects += 1
        return None

    async def neighbours(self, key: CacheKey, vector: np.ndarray, k: int, min_similarity: float) -> list[Neighbour]:
        """The stored answers nearest to a query in its partition (same tenant, model and context), at least
        `min_similarity` close: what they cost, for estimating how long this query's answer will be."""
        now = self.clock()
        near = [(vid, score) for vid, score in self.index.search(key.partition, vector, k) if score >= min_similarity]
        # Read concurrently: on Redis, one round trip's wait for all of them instead of one each (a hot path).
        entries = await asyncio.gather(*(self.store.get(vid) for vid, _ in near))
        return [Neighbour(score, e.completion_tokens) for (_, score), e in zip(near, entries, strict=True)
                if e is not None and e.partition == key.partition and e.tenant == key.tenant and not e.expired(now)
                and e.completion_tokens >= 0]  # fmt: skip

    async def put(
        self,
        key: CacheKey,
        response: Mapping[str, Any],
        vector: np.ndarray | None,
        *,
        tier: str,
        ttl_s: float | None = None,
    ) -> Entry:
        """Store an admitted answer; the index follows the store (replacements and evictions included)."""
        now = self.clock()
        ttl = self.policy.ttl_s if ttl_s is None else min(ttl_s, self.policy.ttl_s or ttl_s)  # a request only shortens
        if vector is None and key.text is not None and self.embedder is not None:
            vector = await self.embedder.embed(key.text)
        prompt_tokens, completion_tokens = _usage(response)
        entry = Entry(
            vid=new_vid(), tenant=key.tenant, namespace=key.namespace, kind=key.kind, model=key.model,
            partition=key.partition, exact_key=key.exact, response=dict(response), tier=tier,
            created_at=now, expires_at=now + ttl if ttl else None, text=key.text, vector=vector,
            embedder_id=self.embedder.model_id if self.embedder else "",
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        )  # fmt: skip
        await self.flush_uses()
        result = await self.store.put(entry, self.policy.max_entries)
        self.index.remove(result.replaced + result.evicted)
        self.stats.evicted += len(result.evicted)
        if vector is not None:
            self.index.add(key.partition, entry.vid, vector)
        self.stats.stored += 1
        return entry

    async def delete(self, vids: list[int]) -> int:
        """Delete entries by id."""
        removed = await self.store.delete(vids)
        self.index.remove(removed)
        return len(removed)

    async def delete_where(self, *, tenant: str | None, namespace: str | None) -> int:
        """Delete every entry of a tenant and/or namespace."""
        removed = await self.store.delete_where(tenant=tenant, namespace=namespace)
        self.index.remove(removed)
        return len(removed)

    async def flush(self) -> int:
        """Delete everything."""
        count = await self.store.flush()
        self.index.clear()
        return count

    async def purge_expired(self) -> int:
        """Drop expired entries from store and index (run periodically)."""
        removed = await self.store.purge_expired(self.clock())
        self.index.remove(removed)
        self.stats.expired += len(removed)
        return len(removed)
