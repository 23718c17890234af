"""How the semantic index scales: lookup latency, memory per entry and the start-up rebuild from Redis, at 10k,
100k and 1M synthetic entries in one partition (the worst case: every entry searched by every lookup).

Per size N (random unit vectors, 384-d float32, as all-MiniLM-L6-v2 gives; answers of ~200 bytes):
  * the index in this process: VectorIndex.load of the N vectors, as a replica's start loads a partition (past
    ivf_threshold it builds an IVF-Flat index on the worker thread: timed), then VectorIndex.search (k=4)
    p50/p99 over --queries lookups (half random vectors, misses; half noisy copies of stored vectors, hits,
    whose top-1 is checked), and its memory: the RSS delta of this process / N;
  * the start-up rebuild: the N entries written to a real redis-server as RedisStore.put lays them out (its
    `queue_entry`, pipelined, without put's events), Redis `used_memory` delta / N, then ResponseCache.rebuild_index
    timed as a Redis replica runs it (reading every vector, then the index build), and on its own the pass
    over expired ids that each minute's upkeep makes (RedisStore.purge_expired).
The entries' event stream is not written: it is capped at STREAM_MAXLEN events (~1.6 KB each, a fixed ~160 MB at
most) and not read by a rebuild. Prints a table, writes bench/results/index_scale.json and .txt.

  .venv/bin/python -m bench.index_scale [--sizes 10000,100000,1000000] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import RESULTS, load_average, machine, percentile, say, write_report
from cache.index import VectorIndex
from cache.policy import CachePolicy
from cache.redis_layout import entry_fields
from cache.redis_store import RedisStore
from cache.response_cache import ResponseCache
from cache.store import Entry
from local_models.processes import stop
from tests.redis_server import start_redis

DIM = 384
PARTITION = hashlib.sha256(b"bench-index-scale-partition").hexdigest()
EMBEDDER_ID = "bench/random-unit-384"
ANSWER = (
    "Synthetic cached answer for the index scale benchmark. It stands in for a short model reply of about "
    "two hundred bytes, the weight of a typical cached chat answer to a factual question. " * 2
)[:200]
TARGETS = {"lookup_p50_ms": 2.0, "rebuild_s": 60.0, "bytes_per_entry": 2500}  # at 1M entries
WRITE_BATCH = 1000


def rss_bytes() -> int:
    """Resident memory of this process (psutil when installed, else /proc/self/status), after handing freed heap
    back to the OS (glibc's malloc_trim): the flat index an IVF build replaces would otherwise still count."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        import psutil
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status") from None
    return int(psutil.Process().memory_info().rss)


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random L2-normalised float32 vectors, normalised in chunks to keep temporaries small."""
    out = rng.standard_normal((n, DIM), dtype=np.float32)
    for start in range(0, n, 65_536):
        chunk = out[start : start + 65_536]
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def make_queries(rng: np.random.Generator, stored: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Half random vectors (misses), half stored vectors plus noise (cosine ~0.95: hits). Returns the queries and,
    per query, the row it should find first (-1 for the random ones)."""
    near = count // 2
    rows = rng.choice(len(stored), size=near, replace=False)
    noise = rng.standard_normal((near, DIM), dtype=np.float32) * np.float32(0.33 / np.sqrt(DIM))
    queries = np.vstack([stored[rows] + noise, unit_vectors(rng, count - near)])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries.astype(np.float32), np.concatenate([rows, np.full(count - near, -1)])


class TimedLoad:
    """Wraps VectorIndex.load and adds up the seconds spent in it (to split the index build out of a rebuild)."""

    def __init__(self, index: VectorIndex) -> None:
        self.load, self.seconds = index.load, 0.0
        index.load = self  # type: ignore[method-assign]

    async def __call__(self, *args: Any) -> None:
        started = time.perf_counter()
        try:
            await self.load(*args)
        finally:
            self.seconds += time.perf_counter() - started


# --- (a) lookups and (b) memory, in this process ---------------------------------------------------------------


def measure_index(vectors: np.ndarray, queries: np.ndarray, expected: np.ndarray, args: argparse.Namespace
                  ) -> dict[str, Any]:  # fmt: skip
    n = len(vectors)
    vids = np.arange(1, n + 1, dtype=np.int64)
    before = rss_bytes()
    index = VectorIndex(DIM, ivf_threshold=args.ivf_threshold, nprobe=args.nprobe)
    started = time.perf_counter()
    asyncio.run(index.load(PARTITION, vids, vectors))
    build_s = time.perf_counter() - started
    after = rss_bytes()
    say(f"  index of {n} built in {build_s:.1f}s ({index.kind(PARTITION)}); searching")
    for q in queries[:50]:  # warm-up
        index.search(PARTITION, q, args.k)
    ms, top1 = [], 0
    for q, want in zip(queries, expected, strict=True):
        started = time.perf_counter()
        hits = index.search(PARTITION, q, args.k)
        ms.append((time.perf_counter() - started) * 1000)
        top1 += int(want >= 0 and bool(hits) and hits[0][0] == int(vids[want]))
    kind = index.kind(PARTITION)
    result = {
        "kind": kind, "nprobe": args.nprobe if kind != "flat" else None, "build_s": round(build_s, 3),
        "lookup_p50_ms": round(percentile(ms, 50), 4), "lookup_p99_ms": round(percentile(ms, 99), 4),
        "lookup_mean_ms": round(float(np.mean(ms)), 4), "queries": len(ms),
        "near_top1_recall": round(top1 / max(1, int((expected >= 0).sum())), 4),
        "rss_delta_bytes": after - before, "index_bytes_per_entry": round((after - before) / n, 1),
        # what FAISS itself should hold per vector: the float32 vector, its id (8 B) and the id's hash-map node
        # (~40 B; IVF's direct map, or IndexIDMap2's reverse map while flat)
        "faiss_estimate_bytes_per_entry": round(DIM * 4 + 8 + 40.0, 1),
    }  # fmt: skip
    del index
    return result


# --- (c) the start-up rebuild from Redis -----------------------------------------------------------------------


@dataclass(frozen=True)
class StubEmbedder:
    """All ResponseCache.rebuild_index needs of an embedder: which vectors are its own."""

    model_id: str = EMBEDDER_ID
    dim: int = DIM


def entry(vid: int, vector: np.ndarray | None, now: float) -> Entry:
    """A synthetic entry shaped like a real cached chat answer."""
    question = f"Synthetic question number {vid} for the index scale benchmark?"
    response = {"id": f"chatcmpl-{vid:016x}", "object": "chat.completion", "created": int(now), "model": "bench",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 18, "completion_tokens": 40, "total_tokens": 58}}  # fmt: skip
    exact = hashlib.sha256(f"exact-{vid}".encode()).hexdigest()
    return Entry(vid=vid, tenant="t-bench", namespace="", kind="chat", model="bench", partition=PARTITION,
                 exact_key=exact, response=response, tier="upstream", created_at=now, expires_at=now + 7 * 86400,
                 text=question, vector=vector, embedder_id=EMBEDDER_ID, prompt_tokens=18,
                 completion_tokens=40)  # fmt: skip


def write_entries(client: redis.Redis, store: RedisStore, n: int, rng: np.random.Generator) -> float:
    """Write n entries with random vectors (made batch by batch: no second copy of them all in memory) as
    RedisStore.put lays them out (hash, exact key, expiries, LRU), pipelined. Returns the seconds it took."""
    started, now = time.perf_counter(), time.time()
    for start in range(0, n, WRITE_BATCH):
        pipe = client.pipeline(transaction=False)
        vectors = unit_vectors(rng, min(WRITE_BATCH, n - start))
        for i, vector in enumerate(vectors, start):
            e = entry(i + 1, vector, now)
            store.queue_entry(pipe, e, entry_fields(e))
        pipe.execute()
    return time.perf_counter() - started


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


async def rebuild(url: str, prefix: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time ResponseCache.rebuild_index against the store as a Redis replica runs it at start (Follower.start:
    no purge), split into reading the vectors and building the index; then, on its own, one upkeep purge."""
    store = RedisStore.from_url(url, prefix=prefix, timeout_s=args.redis_timeout)
    index = VectorIndex(DIM, ivf_threshold=args.ivf_threshold, nprobe=args.nprobe)
    load = TimedLoad(index)
    cache = ResponseCache(store, index, StubEmbedder(), CachePolicy())  # type: ignore[arg-type]
    try:
        started = time.perf_counter()
        loaded = await cache.rebuild_index(purge=False)
        seconds = time.perf_counter() - started
        kind, build_s = index.kind(PARTITION), load.seconds
        del cache, index, load  # the purge below runs without a second 1M index in memory
        started = time.perf_counter()
        purged = len(await store.purge_expired(time.time()))
        purge_s = time.perf_counter() - started
    finally:
        await store.close()
    return {"rebuild_s": round(seconds, 3), "rebuild_loaded": loaded, "rebuild_kind": kind,
            "rebuild_redis_read_s": round(seconds - build_s, 3), "rebuild_index_build_s": round(build_s, 3),
            "upkeep_purge_s": round(purge_s, 3), "upkeep_purged": purged}  # fmt: skip


def measure_redis(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    process = None
    url = args.redis_url
    if url is None:
        process, url = start_redis(workdir / f"redis-{n}.log")
    prefix = f"bench-index-scale-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(url)
    try:
        store = RedisStore.from_url(url, prefix=prefix)
        before = used_memory(client)
        write_s = write_entries(client, store, n, np.random.default_rng(args.seed + n + 1))
        grown = used_memory(client) - before
        say(f"  wrote {n} entries to Redis in {write_s:.1f}s ({grown / n:.0f} B each); rebuilding")
        result = {"redis_write_s": round(write_s, 3), "redis_bytes_per_entry": round(grown / n, 1),
                  **asyncio.run(rebuild(url, prefix, args))}  # fmt: skip
        sample = entry_fields(entry(1, None, time.time()))
        result["response_json_bytes"] = len(sample["response"])
        result["redis_bytes_per_entry_less_answer"] = round(grown / n - len(ANSWER.encode()), 1)
        # where it goes: one entry's keys, as Redis counts them (the LRU sorted set's share is in the delta only)
        result["redis_memory_usage_one_entry"] = {
            "entry_hash": client.memory_usage(store._e(1), samples=0),
            "exact_key": client.memory_usage(store._x(entry(1, None, 0.0).exact_key), samples=0),
            "lru_set_per_member": round((client.memory_usage(store._lru, samples=0) or 0) / n, 1),
        }
        return result
    finally:
        if process is not None:
            stop(process)
        else:
            for key in client.scan_iter(match=f"{prefix}*", count=5000):
                client.unlink(key)
        client.close()


# --- report ----------------------------------------------------------------------------------------------------


def measure_size(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + n)
    vectors = unit_vectors(rng, n)
    queries, expected = make_queries(rng, vectors, args.queries)
    load = load_average()
    row: dict[str, Any] = {"entries": n, **measure_index(vectors, queries, expected, args)}
    del vectors, queries  # the Redis phase makes its own, batch by batch: keep the peak down at 1M
    if not args.skip_redis:
        row |= measure_redis(n, args, workdir)
    row["load_average"] = load + load_average()
    return row


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, checked on the largest size measured (they are stated for 1M entries)."""
    last = rows[-1]
    checks = [
        ("lookup p50 (ms)", last["lookup_p50_ms"], TARGETS["lookup_p50_ms"]),
        ("index memory per entry, this process (B)", last["index_bytes_per_entry"], TARGETS["bytes_per_entry"]),
    ]
    if "rebuild_s" in last:
        checks += [("start-up rebuild from Redis (s)", last["rebuild_s"], TARGETS["rebuild_s"]),
                   ("Redis memory per entry less the answer text (B)", last["redis_bytes_per_entry_less_answer"],
                    TARGETS["bytes_per_entry"])]  # fmt: skip
    return [{"name": name, "entries": last["entries"], "value": value, "limit": limit, "met": bool(value <= limit)}
            for name, value, limit in checks]  # fmt: skip


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"cachecade index scale ({m['platform']}, {m['cpus']} CPUs, Python {m['python']}, faiss "
             f"{report['faiss']}, load average 1/5/15 min start {m['load_average_start']} end "
             f"{m['load_average_end']})", f"data: {report['data']}", "",
             f"{'entries':>9} {'kind':>8} {'build s':>7} {'p50 ms':>7} {'p99 ms':>7} {'top1':>6} "
             f"{'idx B/e':>8} {'redis B/e':>9} {'write s':>8} {'rebuild s':>9} {'(read':>7} {'build s)':>8} "
             f"{'purge s':>7}"]  # fmt: skip
    for r in report["rows"]:
        redis_cols = (f"{r['redis_bytes_per_entry']:>9.0f} {r['redis_write_s']:>8.1f} {r['rebuild_s']:>9.2f} "
                      f"{r['rebuild_redis_read_s']:>7.2f} {r['rebuild_index_build_s']:>8.2f} "
                      f"{r['upkeep_purge_s']:>7.2f}"
                      if "rebuild_s" in r else f"{'-':>9} {'-':>8} {'-':>9} {'-':>7} {'-':>7} {'-':>8}")  # fmt: skip
        lines.append(f"{r['entries']:>9} {r['kind']:>8} {r['build_s']:>7.2f} {r['lookup_p50_ms']:>7.3f} "
                     f"{r['lookup_p99_ms']:>7.3f} "
                     f"{r['near_top1_recall']:>6.3f} {r['index_bytes_per_entry']:>8.0f} {redis_cols}")  # fmt: skip
    for r in report["rows"]:
        if "redis_memory_usage_one_entry" in r:
            u = r["redis_memory_usage_one_entry"]
            lines.append(f"  {r['entries']:>9}: Redis MEMORY USAGE of one entry's hash {u['entry_hash']} B (response "
                         f"JSON {r['response_json_bytes']} B, vector {DIM * 2} B as float16), its exact key "
                         f"{u['exact_key']} B, "
                         f"LRU set {u['lru_set_per_member']} B a member; FAISS alone ~"
                         f"{r['faiss_estimate_bytes_per_entry']:.0f} B an entry")  # fmt: skip
    lines += ["", "idx B/e: RSS delta of this process / N, after malloc_trim (FAISS vectors, id maps, the "
              "index's id dict); redis B/e: used_memory delta / N (answer text: ~200 B); top1: near-duplicate "
              "queries whose first hit is the stored original", "",
              "targets (stated for 1,000,000 entries; checked on the largest size measured)"]  # fmt: skip
    for t in report["targets"]:
        lines.append(f"  {t['name']:<50} at {t['entries']:>9}: {t['value']:>10.2f} <= {t['limit']:<8} "
                     f"{'MET' if t['met'] else 'NOT MET'}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.index_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sizes", default="10000,100000,1000000", help="entries per run, comma-separated")
    p.add_argument("--queries", type=int, default=2000, help="lookups timed per size (2000)")
    p.add_argument("--k", type=int, default=4, help="neighbours per lookup (4, the cache's top_k)")
    p.add_argument("--ivf-threshold", type=int, default=50_000, help="VectorIndex ivf_threshold (50000)")
    p.add_argument("--nprobe", type=int, default=16, help="IVF cells searched per lookup (16, the default)")
    p.add_argument("--redis-url", help="an existing Redis to use (default: start a redis-server per size)")
    p.add_argument(
        "--redis-timeout",
        type=float,
        default=0.5,
        help="RedisStore socket timeout during the rebuild (0.5 s, the CACHECADE_REDIS_TIMEOUT_S default)",
    )
    p.add_argument("--skip-redis", action="store_true", help="only the in-process index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "index_scale.json", help="JSON report (.txt beside it)")
    args = p.parse_args(argv)
    args.sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) < 2 * args.queries:
        p.error("every size must be at least twice --queries")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import faiss

    args = parse_args(argv)
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-index-scale-") as tmp:
        for n in args.sizes:
            say(f"{n} entries")
            rows.append(measure_size(n, args, Path(tmp)))
    loads = {"load_average_start": load_start, "load_average_end": load_average()}
    report = {
        "benchmark": "index_scale",
        "machine": machine() | loads,
        "faiss": faiss.__version__,
        "data": f"synthetic: random unit vectors, {DIM}-d float32, one partition; {len(ANSWER)}-byte answers; "
        f"{args.queries} queries (half random, half noisy copies of stored vectors), k={args.k}; "
        f"ivf_threshold {args.ivf_threshold}, nprobe {args.nprobe}; seed {args.seed}",
        "rows": rows,
        "targets": targets(rows),
    }
    write_report("index_scale", report, render(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
