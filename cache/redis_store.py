"""The shared store: entries in Redis, the source of truth for every replica (`CACHECADE_REDIS_URL`).

Layout, under a prefix (default `cachecade:`), one hash slot per key so it works on Redis Cluster unchanged:
  e:{<vid hex>}      a hash per entry (vector bytes, answer JSON, tenant, partition, model, tier, created, ...),
                     expiring at the entry's absolute TTL through EXPIREAT
  x:{<exact key>}    the vid stored under an exact key (same expiry)
  lru                a sorted set vid -> last use, for the max-entries bound (least recently used go first)
  events             a stream of put / delete / flush / policy events that every replica follows
                     (cache.follower) to keep its FAISS index and its policies in step

A replica that fails to reach Redis gets a StoreError at once (the pipeline then fails open) and, for a backoff
that doubles up to MAX_BACKOFF_S, fails fast without touching the network; the first call after it tries again.
Entries that expire or are evicted by Redis itself (maxmemory) vanish without an event: a replica that finds an
id in its index and no entry treats it as a miss and drops the id.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cache.errors import StoreError
from cache.store import Entry, IndexedVector, PutResult

T = TypeVar("T")
MAX_BACKOFF_S = 10.0
BULK_TIMEOUT_S = 30.0
STREAM_MAXLEN = 100_000  # events kept (approximately); a replica further behind rebuilds from the entries
# Delete a lock only if its value is still ours.
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_TEXT = ("tenant", "namespace", "kind", "model", "partition", "exact_key", "tier", "embedder_id")


@dataclass(frozen=True)
class Event:
    """One change another replica made: what the follower applies to this replica's index and policies."""

    id: str
    op: str  # put | delete | flush | policy
    origin: str
    vid: int = 0
    partition: str = ""
    embedder_id: str = ""
    vector: np.ndarray | None = None
    name: str = ""  # policy: cache | cascade | budgets
    policy: dict[str, Any] | None = None


class Breaker:
    """Fail fast while Redis is unreachable: after a failure, calls raise StoreError at once for a backoff that
    doubles (0.25 s up to MAX_BACKOFF_S); the first call after it tries the network again."""

    def __init__(self) -> None:
        self.errors = 0
        self._backoff = 0.0
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def check(self) -> None:
        """Raise StoreError at once while backing off."""
        now = time.monotonic()
        if now < self._down_until:
            raise StoreError(f"Redis unavailable, retrying in {self._down_until - now:.1f}s")

    def failed(self, exc: BaseException) -> StoreError:
        """Record a failure (start or lengthen the backoff); returns the StoreError to raise."""
        self.errors += 1
        self._backoff = min(MAX_BACKOFF_S, self._backoff * 2 or 0.25)
        self._down_until = time.monotonic() + self._backoff
        return StoreError(f"Redis: {exc}")

    async def run(self, call: Awaitable[T]) -> T:
        try:
            self.check()
        except StoreError:
            if hasattr(call, "close"):
                call.close()  # the coroutine never runs
            raise
        try:
            result = await call
        except (RedisError, OSError) as exc:
            raise self.failed(exc) from exc
        self._backoff = 0.0
        return result


def _hex(vid: int) -> str:
    return format(vid, "016x")


def _fields(e: Entry) -> dict[str, Any]:
    fields: dict[str, Any] = {k: getattr(e, k) for k in _TEXT}
    fields |= {"vid": _hex(e.vid), "response": json.dumps(e.response, allow_nan=False),
               "created_at": repr(e.created_at), "expires_at": "" if e.expires_at is None else repr(e.expires_at),
               "prompt_tokens": e.prompt_tokens, "completion_tokens": e.completion_tokens,
               "text": "" if e.text is None else e.text}  # fmt: skip
    if e.vector is not None:
        fields["vector"] = np.asarray(e.vector, dtype=np.float32).tobytes()
    return fields


def _entry(raw: Mapping[bytes, bytes]) -> Entry:
    f = {k.decode(): v for k, v in raw.items()}
    text = {k: f[k].decode() for k in _TEXT}
    expires = f["expires_at"].decode()
    vector = np.frombuffer(f["vector"], dtype=np.float32) if f.get("vector") else None
    return Entry(
        vid=int(f["vid"], 16), **text, response=json.loads(f["response"]), created_at=float(f["created_at"]),
        expires_at=float(expires) if expires else None, text=f["text"].decode() or None, vector=vector,
        prompt_tokens=int(f["prompt_tokens"]), completion_tokens=int(f["completion_tokens"]),
    )  # fmt: skip


class RedisStore:
    """EntryStore on Redis or Redis Cluster. Build with `RedisStore.from_url(url)`."""

    def __init__(self, client: redis.Redis | RedisCluster, prefix: str = "cachecade:",
                 bulk: redis.Redis | RedisCluster | None = None) -> None:  # fmt: skip
        # Any: redis-py types replies as unions of str / bytes / awaitables; with decode_responses off (the default)
        # they are bytes, which is what this module reads.
        self.client: Any = client
        self.bulk: Any = bulk or client  # for scans: same server, longer read timeout
        self.prefix = prefix
        self.origin = uuid.uuid4().hex  # this replica, so it skips its own events
        self.breaker = Breaker()
        self._unlock_script = self.client.register_script(_UNLOCK)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, prefix: str = "cachecade:", timeout_s: float = 0.5
                 ) -> RedisStore:  # fmt: skip
        """Connect lazily; short timeouts, because a slow store must not make requests slow (fail open)."""

        def connect(read_timeout_s: float) -> redis.Redis | RedisCluster:
            options: dict[str, Any] = {"socket_timeout": read_timeout_s, "socket_connect_timeout": timeout_s}
            return RedisCluster.from_url(url, **options) if cluster else redis.Redis.from_url(url, **options)

        # Scans (the rebuild at start, deletes by tenant) move megabytes per batch: they get a longer read timeout.
        return cls(connect(timeout_s), prefix, bulk=connect(max(timeout_s, BULK_TIMEOUT_S)))

    # --- keys and the circuit breaker ---------------------------------------------------------------------------

    def _e(self, vid: int) -> str:
        return f"{self.prefix}e:{{{_hex(vid)}}}"

    def _x(self, exact_key: str) -> str:
        return f"{self.prefix}x:{{{exact_key}}}"

    @property
    def events_key(self) -> str:
        return f"{self.prefix}events"

    @property
    def _lru(self) -> str:
        return f"{self.prefix}lru"

    async def _run(self, call: Awaitable[T]) -> T:
        return await self.breaker.run(call)

    @property
    def available(self) -> bool:
        """False while backing off after a failure."""
        return self.breaker.available

    @property
    def errors(self) -> int:
        """Redis calls that failed since start."""
        return self.breaker.errors

    # --- events -------------------------------------------------------------------------------------------------

    def _event(self, pipe: Any, op: str, **fields: Any) -> None:
        pipe.xadd(self.events_key, {"op": op, "origin": self.origin, **fields}, maxlen=STREAM_MAXLEN,
                  approximate=True)  # fmt: skip

    async def publish_policy(self, name: str, policy: Mapping[str, Any]) -> None:
        """Tell every replica about a policy change made here."""
        pipe = self.client.pipeline(transaction=False)
        self._event(pipe, "policy", name=name, policy=json.dumps(policy))
        await self._run(pipe.execute())

    async def last_event_id(self) -> str:
        """The id of the newest event ("0-0" when there is none): where a follower starts after a rebuild."""
        newest = await self._run(self.client.xrevrange(self.events_key, count=1))
        return newest[0][0].decode() if newest else "0-0"

    async def first_event_id(self) -> str | None:
        oldest = await self._run(self.client.xrange(self.events_key, count=1))
        return oldest[0][0].decode() if oldest else None

    async def read_events(self, after: str, block_ms: int, count: int = 500) -> list[Event]:
        """Events newer than `after`, waiting up to block_ms for the first."""
        reply = await self._run(self.client.xread({self.events_key: after}, count=count, block=block_ms))
        return [self._decode(i, f) for _, items in reply or [] for i, f in items]

    @staticmethod
    def _decode(event_id: bytes, f: Mapping[bytes, bytes]) -> Event:
        get = lambda k: f.get(k.encode(), b"").decode()  # noqa: E731
        vector = np.frombuffer(f[b"vector"], dtype=np.float32) if f.get(b"vector") else None
        policy = json.loads(f[b"policy"]) if f.get(b"policy") else None
        return Event(event_id.decode(), get("op"), get("origin"), int(get("vid") or "0", 16), get("partition"),
                     get("embedder_id"), vector, get("name"), policy)  # fmt: skip

    # --- EntryStore ---------------------------------------------------------------------------------------------

    async def put(self, entry: Entry, max_entries: int | None) -> PutResult:
        old = await self._run(self.client.get(self._x(entry.exact_key)))
        replaced = [int(old, 16)] if old is not None and int(old, 16) != entry.vid else []
        pipe = self.client.pipeline(transaction=False)
        try:
            fields = _fields(entry)
        except ValueError as exc:  # NaN in an answer: not storable, and not a reason to fail the request
            raise StoreError(f"answer not storable: {exc}") from exc
        pipe.hset(self._e(entry.vid), mapping=fields)
        pipe.set(self._x(entry.exact_key), _hex(entry.vid))
        if entry.expires_at is not None:
            pipe.expireat(self._e(entry.vid), int(entry.expires_at) + 1)
            pipe.expireat(self._x(entry.exact_key), int(entry.expires_at) + 1)
        pipe.zadd(self._lru, {_hex(entry.vid): entry.created_at})
        for vid in replaced:
            pipe.delete(self._e(vid))
            pipe.zrem(self._lru, _hex(vid))
        vector = b"" if entry.vector is None else np.asarray(entry.vector, dtype=np.float32).tobytes()
        self._event(pipe, "put", vid=_hex(entry.vid), partition=entry.partition, embedder_id=entry.embedder_id,
                    vector=vector)  # fmt: skip
        for vid in replaced:
            self._event(pipe, "delete", vid=_hex(vid))
        await self._run(pipe.execute())
        evicted = await self._evict(max_entries, keep=entry.vid) if max_entries is not None else []
        return PutResult(replaced, evicted)

    async def _evict(self, max_entries: int, keep: int) -> list[int]:
        count = await self._run(self.client.zcard(self._lru))
        if count <= max_entries:
            return []
        oldest = await self._run(self.client.zrange(self._lru, 0, count - max_entries))
        victims = [v for v in (int(x, 16) for x in oldest) if v != keep][: count - max_entries]
        return await self.delete(victims)

    async def get(self, vid: int) -> Entry | None:
        raw = await self._run(self.client.hgetall(self._e(vid)))
        try:
            return _entry(raw) if raw else None
        except (KeyError, ValueError, UnicodeDecodeError) as exc:  # a damaged entry is a miss, never a 500
            raise StoreError(f"Redis entry {_hex(vid)} is malformed: {exc!r}") from exc

    async def get_exact(self, exact_key: str, now: float) -> Entry | None:
        vid = await self._run(self.client.get(self._x(exact_key)))
        entry = await self.get(int(vid, 16)) if vid is not None else None
        if entry is None or entry.exact_key != exact_key or entry.expired(now):
            return None
        return entry

    async def touch(self, last_used: dict[int, float]) -> None:
        if last_used:
            await self._run(self.client.zadd(self._lru, {_hex(v): t for v, t in last_used.items()}, xx=True, gt=True))

    async def delete(self, vids: list[int]) -> list[int]:
        if not vids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for vid in vids:
            pipe.hget(self._e(vid), "exact_key")
        exact_keys = await self._run(pipe.execute())
        found = [(vid, key.decode()) for vid, key in zip(vids, exact_keys, strict=True) if key is not None]
        pipe = self.client.pipeline(transaction=False)
        for vid, _ in found:
            pipe.delete(self._e(vid))
            self._event(pipe, "delete", vid=_hex(vid))
        pipe.zrem(self._lru, *[_hex(v) for v in vids])
        await self._run(pipe.execute())
        await self._drop_exact(found)
        return [vid for vid, _ in found]

    async def _drop_exact(self, found: Iterable[tuple[int, str]]) -> None:
        """Remove exact keys that still point at deleted entries (not ones a newer entry took over)."""
        for vid, exact_key in found:
            if await self._run(self.client.get(self._x(exact_key))) == _hex(vid).encode():
                await self._run(self.client.delete(self._x(exact_key)))

    async def _scan_entries(self, fields: tuple[str, ...]) -> AsyncIterator[tuple[int, list[bytes | None]]]:
        """(vid, values of `fields`) of every entry, in batches."""
        batch: list[int] = []

        async def flush() -> AsyncIterator[tuple[int, list[bytes | None]]]:
            pipe = self.bulk.pipeline(transaction=False)
            for vid in batch:
                pipe.hmget(self._e(vid), list(fields))
            for vid, values in zip(batch, await self._run(pipe.execute()), strict=True):
                yield vid, values
            batch.clear()

        self.breaker.check()
        try:
            async for key in self.bulk.scan_iter(match=f"{self.prefix}e:*", count=1000):
                batch.append(int(key.decode().rsplit("{", 1)[1].rstrip("}"), 16))
                if len(batch) >= 1000:
                    async for item in flush():
                        yield item
        except (RedisError, OSError) as exc:
            raise self.breaker.failed(exc) from exc
        async for item in flush():
            yield item

    async def delete_where(self, *, tenant: str | None, namespace: str | None) -> list[int]:
        wanted = []
        async for vid, (t, ns) in self._scan_entries(("tenant", "namespace")):
            if t is not None and tenant in (None, t.decode()) and namespace in (None, (ns or b"").decode()):
                wanted.append(vid)
        return await self.delete(wanted)

    async def flush(self) -> int:
        count = len(await self.delete_where(tenant=None, namespace=None))
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self._lru)
        self._event(pipe, "flush")
        await self._run(pipe.execute())
        return count

    async def purge_expired(self, now: float) -> list[int]:
        """Entries Redis expired leave their id in the LRU set: drop those ids (and tell the replicas)."""
        ids = [int(x, 16) for x in await self._run(self.bulk.zrange(self._lru, 0, -1))]  # a scan: bulk timeout
        gone = []
        for start in range(0, len(ids), 1000):
            chunk = ids[start : start + 1000]
            pipe = self.bulk.pipeline(transaction=False)
            for vid in chunk:
                pipe.exists(self._e(vid))
            gone += [vid for vid, alive in zip(chunk, await self._run(pipe.execute()), strict=True) if not alive]
        if gone:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._lru, *[_hex(v) for v in gone])
            for vid in gone:
                self._event(pipe, "delete", vid=_hex(vid))
            await self._run(pipe.execute())
        return gone

    async def count(self) -> int:
        return int(await self._run(self.client.zcard(self._lru)))

    async def list_entries(self, *, tenant: str | None, namespace: str | None, limit: int) -> list[Entry]:
        entries = []
        async for vid, _ in self._scan_entries(("vid",)):
            entry = await self.get(vid)
            if entry is not None and tenant in (None, entry.tenant) and namespace in (None, entry.namespace):
                entries.append(entry)
        return sorted(entries, key=lambda e: e.created_at, reverse=True)[:limit]

    async def iter_vectors(self, embedder_id: str) -> AsyncIterator[IndexedVector]:
        now = time.time()
        fields = ("partition", "vector", "embedder_id", "expires_at")
        async for vid, (partition, vector, embedder, expires) in self._scan_entries(fields):
            live = not expires or float(expires) > now
            if vector and embedder == embedder_id.encode() and partition is not None and live:
                yield IndexedVector(vid, partition.decode(), np.frombuffer(vector, dtype=np.float32))

    async def embedder_ids(self, limit: int = 1000) -> set[str]:
        """The embedder ids of (up to `limit`) stored entries: a replica checks it does not mix vectors."""
        seen: set[str] = set()
        async for _, (embedder,) in self._scan_entries(("embedder_id",)):
            if embedder:
                seen.add(embedder.decode())
            limit -= 1
            if limit <= 0:
                break
        return seen

    # --- single-flight locks -------------------------------------------------------------------------------------

    def _lock(self, exact_key: str) -> str:
        return f"{self.prefix}lock:{{{exact_key}}}"

    async def try_lock(self, exact_key: str, ttl_s: float) -> bool:
        """Take the lock of an exact key for this replica (expires by itself after ttl_s)."""
        taken = await self._run(self.client.set(self._lock(exact_key), self.origin, nx=True, px=int(ttl_s * 1000)))
        return bool(taken)

    async def is_locked(self, exact_key: str) -> bool:
        return bool(await self._run(self.client.exists(self._lock(exact_key))))

    async def unlock(self, exact_key: str) -> None:
        """Release the lock if this replica still holds it (one that expired and was retaken is left alone)."""
        await self._run(self._unlock_script(keys=[self._lock(exact_key)], args=[self.origin]))

    async def ping(self) -> None:
        await self._run(self.client.ping())

    async def close(self) -> None:
        for client in {id(self.client): self.client, id(self.bulk): self.bulk}.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
