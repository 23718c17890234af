"""The shared store: entries in Redis, the source of truth for every replica (`CACHECADE_REDIS_URL`).

Layout, under a prefix (default `cachecade:`), one hash slot per key so it works on Redis Cluster unchanged:
  e:{<vid hex>}      a hash per entry (four fields: cache.redis_layout), expiring at the entry's absolute TTL
                     through EXPIREAT
  x:{<exact key>}    the vid stored under an exact key (same expiry)
  lru                a sorted set vid -> last use, for the max-entries bound (least recently used go first)
  events             a stream of put / delete / flush / policy events that every replica follows
                     (cache.follower) to keep its FAISS index and its policies in step

A replica that fails to reach Redis gets a StoreError at once (the pipeline then fails open) and, for a backoff
that doubles up to 10 s (cache.breaker), fails fast without touching the network; the first call after it tries
again.
Entries that expire or are evicted by Redis itself (maxmemory) vanish without an event: a replica that finds an
id in its index and no entry treats it as a miss and drops the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from cache.breaker import Breaker
from cache.errors import StoreError
from cache.labels import Label, Served
from cache.redis_layout import (
    META,
    REBUILD_FIELDS,
    entry_fields,
    entry_of,
    index_fields,
    small_fields,
    stored_vector,
)
from cache.store import Entry, IndexedVector, PutResult, hex_id

T = TypeVar("T")
BULK_TIMEOUT_S = 30.0
STREAM_MAXLEN = 100_000  # events kept (approximately); a replica further behind rebuilds from the entries
LABEL_CLAIM_TTL_S = 7 * 24 * 3600  # a request labelled once stays labelled past any served_ttl_s
BATCH = 1000  # entries per bulk read: one Lua script (a few ms of the server's time) or one pipeline
PARALLEL = 4  # bulk reads in flight, so the server works while this process decodes the previous replies
ID_PAGE = 10_000  # LRU ids per ZSCAN call: ~8 ms of the server's time each
# Delete a key only if it still holds the given value: a lock that is still ours, an exact key that still points at
# the entry being deleted (not at a newer one another replica put meanwhile).
_DELETE_IF_EQUAL = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# `ARGV[1] key ARGV[2..]` on each key: a batch of reads in one round trip, parsed as one reply.
_EACH = "local out = {} for i, k in ipairs(KEYS) do out[i] = redis.call(ARGV[1], k, unpack(ARGV, 2)) end return out"


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
        self._delete_if_equal = self.client.register_script(_DELETE_IF_EQUAL)
        self._each_script = self.bulk.register_script(_EACH)

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
        return f"{self.prefix}e:{{{hex_id(vid)}}}"

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
            fields = entry_fields(entry)
        except ValueError as exc:  # NaN in an answer, say: not storable, and not a reason to fail the request
            raise StoreError(f"answer not storable: {exc}") from exc
        pipe.delete(self._e(entry.vid))  # the same id again: no field (or TTL) of the earlier write is left behind
        self.queue_entry(pipe, entry, fields)
        for vid in replaced:
            pipe.delete(self._e(vid))
            pipe.zrem(self._lru, hex_id(vid))
        vector = b"" if entry.vector is None else np.asarray(entry.vector, dtype=np.float32).tobytes()
        self._event(pipe, "put", vid=hex_id(entry.vid), partition=entry.partition, embedder_id=entry.embedder_id,
                    vector=vector)  # fmt: skip
        for vid in replaced:
            self._event(pipe, "delete", vid=hex_id(vid))
        pipe.zcard(self._lru)  # the size after this put, for the bound: no second round trip
        count = (await self._run(pipe.execute()))[-1]
        evicted = await self._evict(max_entries, count, keep=entry.vid) if max_entries is not None else []
        return PutResult(replaced, evicted)

    def queue_entry(self, pipe: Any, entry: Entry, fields: Mapping[str, Any]) -> None:
        """Queue an entry's keys on a pipeline (async or not): its hash, its exact key, their expiry and its LRU
        member. bench.index_scale writes its entries through this too, so it measures this layout."""
        pipe.hset(self._e(entry.vid), mapping=fields)
        pipe.set(self._x(entry.exact_key), hex_id(entry.vid))
        if entry.expires_at is not None:
            pipe.expireat(self._e(entry.vid), int(entry.expires_at) + 1)
            pipe.expireat(self._x(entry.exact_key), int(entry.expires_at) + 1)
        pipe.zadd(self._lru, {hex_id(entry.vid): entry.created_at})

    async def _evict(self, max_entries: int, count: int, keep: int) -> list[int]:
        if count <= max_entries:
            return []
        oldest = await self._run(self.client.zrange(self._lru, 0, count - max_entries))
        victims = [v for v in (int(x, 16) for x in oldest) if v != keep][: count - max_entries]
        return await self.delete(victims)

    async def get(self, vid: int) -> Entry | None:
        raw = await self._run(self.client.hgetall(self._e(vid)))
        try:
            return entry_of(vid, raw) if raw else None
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:  # a damaged entry is a miss, not a 500
            raise StoreError(f"Redis entry {hex_id(vid)} is malformed: {exc!r}") from exc

    async def get_exact(self, exact_key: str, now: float) -> Entry | None:
        vid = await self._run(self.client.get(self._x(exact_key)))
        entry = await self.get(int(vid, 16)) if vid is not None else None
        if entry is None or entry.exact_key != exact_key or entry.expired(now):
            return None
        return entry

    async def touch(self, last_used: dict[int, float]) -> None:
        if last_used:
            await self._run(self.client.zadd(self._lru, {hex_id(v): t for v, t in last_used.items()}, xx=True, gt=True))

    async def delete(self, vids: list[int]) -> list[int]:
        """Delete entries (and their exact keys), BATCH ids per round trip: a flush of 1M entries must not put
        them all in one pipeline on the request path's short timeout."""
        deleted: list[int] = []
        for start in range(0, len(vids), BATCH):
            deleted += await self._delete_batch(vids[start : start + BATCH])
        return deleted

    async def _delete_batch(self, vids: list[int]) -> list[int]:
        if not vids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for vid in vids:
            pipe.hmget(self._e(vid), ["meta", "exact_key"])  # exact_key: the earlier layout
        rows = await self._run(pipe.execute())
        found = [(vid, json.loads(meta)[META.index("exact_key")] if meta else old.decode())
                 for vid, (meta, old) in zip(vids, rows, strict=True) if meta or old is not None]  # fmt: skip
        pipe = self.client.pipeline(transaction=False)
        for vid, _ in found:
            pipe.delete(self._e(vid))
            self._event(pipe, "delete", vid=hex_id(vid))
        pipe.zrem(self._lru, *[hex_id(v) for v in vids])
        await self._run(pipe.execute())
        await self._drop_exact(found)
        return [vid for vid, _ in found]

    async def _drop_exact(self, found: list[tuple[int, str]]) -> None:
        """Remove exact keys that still point at deleted entries (not ones a newer entry took over)."""
        if not found:
            return
        pipe = self.client.pipeline(transaction=False)  # EVAL, not a script object: cluster pipelines route it
        for vid, exact_key in found:  # by its key; one per key, as the keys are in other slots there
            pipe.eval(_DELETE_IF_EQUAL, 1, self._x(exact_key), hex_id(vid))
        await self._run(pipe.execute())

    # --- bulk reads ---------------------------------------------------------------------------------------------

    async def _each(self, command: str, vids: list[int], args: Sequence[str]) -> list[Any]:
        """`command <entry key> *args` for each id, in one round trip: a Lua script on Redis, a pipeline on a
        cluster (a script cannot span hash slots there). Raises RedisError: callers go through the breaker."""
        keys = [self._e(vid) for vid in vids]
        if isinstance(self.bulk, RedisCluster):
            pipe = self.bulk.pipeline(transaction=False)
            for key in keys:
                pipe.execute_command(command, key, *args)
            return list(await pipe.execute())
        return list(await self._each_script(keys=keys, args=[command, *args]))

    async def _lru_ids(self) -> np.ndarray:
        """Every id in the LRU set (every entry is there: `put` adds it with the hash), each once. ZSCAN, not
        ZRANGE by rank: evictions and uses reorder the set while it is read, and paging by rank would skip ids."""
        pages, cursor = [], 0
        while True:
            cursor, page = await self._run(self.bulk.zscan(self._lru, cursor, count=ID_PAGE))
            pages.append(np.array([int(member, 16) for member, _ in page], dtype=np.int64))
            if not cursor:
                return np.unique(np.concatenate(pages))

    async def _each_batch(self, command: str, vids: np.ndarray, args: Sequence[str] = ()
                          ) -> AsyncGenerator[tuple[list[int], list[Any]], None]:  # fmt: skip
        """(ids, replies) of `_each` over `vids` in batches of BATCH, PARALLEL batches in flight."""
        self.breaker.check()
        window: deque[tuple[list[int], asyncio.Task[list[Any]]]] = deque()

        async def oldest() -> tuple[list[int], list[Any]]:
            batch, task = window[0]
            replies = await self._run(task)
            window.popleft()
            return batch, replies

        try:
            for start in range(0, len(vids), BATCH):
                batch = vids[start : start + BATCH].tolist()
                window.append((batch, asyncio.ensure_future(self._each(command, batch, args))))
                if len(window) == PARALLEL:
                    yield await oldest()
            while window:
                yield await oldest()
        finally:  # stopped early or failed: cancel what is still in flight, and collect its errors
            for _, task in window:
                task.cancel()
            await asyncio.gather(*(task for _, task in window), return_exceptions=True)

    async def _scan_ids(self) -> AsyncIterator[list[int]]:
        """The ids of every entry hash, BATCH at a time, by SCAN: slower than listing the LRU set, but it also finds
        a hash that a write cut short left out of it. For the rare scans that must miss nothing (deletes)."""
        batch: list[int] = []
        self.breaker.check()
        try:
            async for key in self.bulk.scan_iter(match=f"{self.prefix}e:*", count=BATCH):
                batch.append(int(key.decode().rsplit("{", 1)[1].rstrip("}"), 16))
                if len(batch) >= BATCH:
                    yield batch
                    batch = []
        except (RedisError, OSError) as exc:
            raise self.breaker.failed(exc) from exc
        if batch:
            yield batch

    async def _scan_entries(self, fields: tuple[str, ...]) -> AsyncIterator[tuple[int, list[bytes | None]]]:
        """(vid, values of `fields`) of every entry hash."""
        async for batch in self._scan_ids():
            for item in zip(batch, await self._run(self._each("HMGET", batch, fields)), strict=True):
                yield item

    async def _scan_meta(self) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """(vid, small fields) of every entry hash; hashes gone (or damaged) since the SCAN are skipped."""
        fields = ("meta", *META)
        async for vid, values in self._scan_entries(fields):
            with contextlib.suppress(KeyError, ValueError, TypeError, UnicodeDecodeError):
                yield vid, small_fields(dict(zip(fields, values, strict=True)))

    # --- scans --------------------------------------------------------------------------------------------------

    async def delete_where(self, *, tenant: str | None, namespace: str | None) -> list[int]:
        wanted = [vid async for vid, meta in self._scan_meta()
                  if tenant in (None, meta["tenant"]) and namespace in (None, meta["namespace"])]  # fmt: skip
        return await self.delete(wanted)

    async def flush(self) -> int:
        count = len(await self.delete_where(tenant=None, namespace=None))
        # What is left in the LRU set are ids of entries Redis had expired: drop those. Not a DEL of the whole set,
        # which would also drop the id of an entry put while the flush ran and leave it outside the bound.
        await self.purge_expired(time.time())
        pipe = self.client.pipeline(transaction=False)
        self._event(pipe, "flush")
        await self._run(pipe.execute())
        return count

    async def purge_expired(self, now: float) -> list[int]:
        """Entries Redis expired leave their id in the LRU set: drop those ids (and tell the replicas)."""
        gone = []
        async with contextlib.aclosing(self._each_batch("EXISTS", await self._lru_ids())) as batches:
            async for batch, alive in batches:
                gone += [vid for vid, exists in zip(batch, alive, strict=True) if not exists]
        if gone:
            pipe = self.client.pipeline(transaction=False)
            pipe.zrem(self._lru, *[hex_id(v) for v in gone])
            for vid in gone:
                self._event(pipe, "delete", vid=hex_id(vid))
            await self._run(pipe.execute())
        return gone

    async def count(self) -> int:
        return int(await self._run(self.client.zcard(self._lru)))

    async def list_entries(self, *, tenant: str | None, namespace: str | None, limit: int) -> list[Entry]:
        wanted = [(meta["created_at"], vid) async for vid, meta in self._scan_meta()
                  if tenant in (None, meta["tenant"]) and namespace in (None, meta["namespace"])]  # fmt: skip
        newest = [await self.get(vid) for _, vid in sorted(wanted, reverse=True)[:limit]]
        return [entry for entry in newest if entry is not None]

    async def iter_vectors(self, embedder_id: str) -> AsyncIterator[IndexedVector]:
        """Ids from the LRU set, then their entries' `ix` read in batches: ~10 us an entry with hiredis, where a
        SCAN of the keyspace and an HMGET per key took ~28 us (~40 us with redis-py's own parser)."""
        now, mine = time.time(), embedder_id.encode()
        # aclosing: a caller that stops early closes the batches at once, cancelling the reads in flight
        async with contextlib.aclosing(self._each_batch("HMGET", await self._lru_ids(), REBUILD_FIELDS)) as batches:
            async for batch, rows in batches:
                for vid, values in zip(batch, rows, strict=True):
                    partition, embedder, expires, v16 = index_fields(values)
                    if embedder == mine and partition is not None and (not expires or float(expires) > now):
                        vector = stored_vector(v16, values[1])
                        if vector is not None:
                            yield IndexedVector(vid, partition.decode(), vector)

    async def embedder_ids(self, limit: int = 1000) -> set[str]:
        """The embedder ids of (up to `limit`) stored entries: a replica checks it does not mix vectors."""
        seen: set[str] = set()
        async for _, values in self._scan_entries(REBUILD_FIELDS):
            embedder = index_fields(values)[1]
            if embedder:
                seen.add(embedder.decode())
            limit -= 1
            if limit <= 0:
                break
        return seen

    # --- labels (cache/labels.py) -------------------------------------------------------------------------------

    async def save_responses(self, items: list[tuple[str, str, str, float]]) -> None:
        """Keep stored responses, (key_id, response_id, record, expires_at) each, in one round trip: keys that
        expire by themselves, read by every replica."""
        pipe = self.client.pipeline(transaction=False)
        now = time.time()
        for key_id, response_id, record, expires_at in items:
            pipe.set(self._response(key_id, response_id), record, px=max(1, int((expires_at - now) * 1000)))
        await self._run(pipe.execute())

    async def load_response(self, key_id: str, response_id: str, now: float) -> str | None:
        raw = await self._run(self.client.get(self._response(key_id, response_id)))
        return None if raw is None else raw.decode()  # (the client returns bytes: decode_responses is off)

    async def delete_response(self, key_id: str, response_id: str) -> bool:
        return bool(await self._run(self.client.delete(self._response(key_id, response_id))))

    def _response(self, key_id: str, response_id: str) -> str:
        return f"{self.prefix}resp:{{{key_id}:{response_id}}}"

    def _served(self, key_id: str, request_id: str) -> str:
        return f"{self.prefix}r:{{{key_id}:{request_id}}}"

    def _labels(self, scope: str) -> str:
        return f"{self.prefix}l:{{{scope}}}"

    @property
    def _scopes(self) -> str:
        return f"{self.prefix}label-scopes"

    async def remember(self, served: Served, expires_at: float) -> None:
        """Keep what answered a request until `expires_at` (a key that expires by itself), for feedback."""
        ttl_ms = max(1, int((expires_at - time.time()) * 1000))
        await self._run(self.client.set(self._served(served.key_id, served.request_id), served.dumps(), px=ttl_ms))

    async def recall(self, key_id: str, request_id: str, now: float) -> Served | None:
        raw = await self._run(self.client.get(self._served(key_id, request_id)))
        return None if raw is None else Served.loads(raw)

    async def claim_label(self, key_id: str, request_id: str) -> bool:
        """True the first time a request is labelled, False after (one label per request, on every replica)."""
        key = self._served(key_id, request_id) + ":labelled"
        return bool(await self._run(self.client.set(key, b"1", nx=True, ex=LABEL_CLAIM_TTL_S)))

    async def add_label(self, label: Label, keep: int) -> None:
        """Append a label to its scope's list, keeping the newest `keep`."""
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(self._labels(label.scope), label.dumps())
        pipe.ltrim(self._labels(label.scope), 0, keep - 1)
        pipe.sadd(self._scopes, label.scope)
        await self._run(pipe.execute())

    async def labels(self, scope: str, limit: int) -> list[Label]:
        """The newest `limit` labels of a scope, newest first."""
        return [Label.loads(raw) for raw in await self._run(self.client.lrange(self._labels(scope), 0, limit - 1))]

    async def label_scopes(self) -> list[str]:
        return sorted(raw.decode() for raw in await self._run(self.client.smembers(self._scopes)))

    # --- runtime policies and the audit log (proxy/services.py) ------------------------------------------------

    async def save_policy(self, name: str, record: str) -> None:
        await self._run(self.client.hset(f"{self.prefix}runtime-policies", name, record))

    async def load_policy(self, name: str) -> str | None:
        raw = await self._run(self.client.hget(f"{self.prefix}runtime-policies", name))
        return None if raw is None else raw.decode()

    async def append_audit(self, record: str, keep: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(f"{self.prefix}audit", record)
        pipe.ltrim(f"{self.prefix}audit", 0, keep - 1)
        await self._run(pipe.execute())

    async def audit(self, limit: int) -> list[str]:
        return [raw.decode() for raw in await self._run(self.client.lrange(f"{self.prefix}audit", 0, limit - 1))]

    # --- the cascade router's memory (proxy/router.py) ----------------------------------------------------------

    @property
    def _route_log(self) -> str:
        return f"{self.prefix}route-samples"

    async def add_route_samples(self, samples: list[str], keep: int) -> None:
        """Append samples to the router's log (a stream, trimmed to about the newest `keep`)."""
        pipe = self.client.pipeline(transaction=False)
        for sample in samples:
            pipe.xadd(self._route_log, {"s": sample}, maxlen=keep, approximate=True)
        await self._run(pipe.execute())

    async def route_samples(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Up to `limit` (cursor, sample) after the cursor `after` ("" from the oldest kept), oldest first."""
        rows = await self._run(self.client.xrange(self._route_log, f"({after}" if after else "-", "+", count=limit))
        return [(i.decode() if isinstance(i, bytes) else i, fields[b"s"].decode()) for i, fields in rows]

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
        await self._run(self._delete_if_equal(keys=[self._lock(exact_key)], args=[self.origin]))

    async def ping(self) -> None:
        await self._run(self.client.ping())

    async def close(self) -> None:
        for client in {id(self.client): self.client, id(self.bulk): self.bulk}.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
