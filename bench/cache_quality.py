"""Cache quality through the real cache code: insert every `text_a`, query every `text_b`, count what is served.

QQP repeats questions across pairs, so a `text_b` is often stored verbatim as another pair's `text_a`: serving
that entry is right (the same question) and is counted apart (`identical_question_hits`), not as a false hit.
Serving any other stored question counts as wrong, although QQP leaves most such pairs unlabelled and some are
true duplicates: the false-hit figures here are an upper bound.

Runs ResponseCache (keys, SQLite store, FAISS index, admission) in-process. Vectors are computed once in batches
by the same embedder the proxy uses and handed to the cache, so the sweep over thresholds costs one lookup per
query: a lookup at the lowest threshold returns the best candidate, and at a higher threshold the answer is the
same candidate or a miss.

  python -m bench.cache_quality --data ../shared/data [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import machine, write_json
from cache.calibration import wilson
from cache.embedder import DEFAULT_EMBEDDER, load_embedder
from cache.index import VectorIndex
from cache.keys import chat_key
from cache.policy import CachePolicy
from cache.response_cache import Lookup, ResponseCache
from cache.sqlite_store import SQLiteStore
from proxy.config import DEFAULT_THRESHOLD

THRESHOLDS = [0.80, 0.85, 0.88, 0.90, 0.92, 0.94, DEFAULT_THRESHOLD, 0.96, 0.97, 0.98]


class Precomputed:
    """An AsyncEmbedder stand-in that returns vectors computed beforehand by the real embedder."""

    def __init__(self, vectors: dict[str, np.ndarray], model_id: str, dim: int) -> None:
        self.vectors, self.model_id, self.dim = vectors, model_id, dim

    async def embed(self, text: str) -> np.ndarray:
        return self.vectors[text]


def body(text: str) -> dict[str, Any]:
    return {"model": "bench-model", "messages": [{"role": "user", "content": text}]}


def answer(i: int) -> dict[str, Any]:
    return {"object": "chat.completion", "model": "bench-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {i}"},
                         "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}  # fmt: skip


async def run(stored: Sequence[str], queries: Sequence[str], cache_dir: Path) -> list[tuple[str | None, float]]:
    """Insert `stored`, then look every query up; returns (served text or None, similarity) per query."""
    embedder = load_embedder(DEFAULT_EMBEDDER, "onnx", cache_dir)
    texts = sorted(set(stored) | set(queries))
    vectors = dict(zip(texts, embedder.encode(texts), strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        store = await SQLiteStore.open(Path(tmp) / "bench.sqlite3")
        policy = CachePolicy(threshold=min(THRESHOLDS), top_k=1, max_entries=None, ttl_s=None)
        cache = ResponseCache(store, VectorIndex(embedder.dim, ivf_threshold=10**9),
                              Precomputed(vectors, embedder.model_id, embedder.dim), policy)  # type: ignore[arg-type]  # fmt: skip
        for i, text in enumerate(stored):
            await cache.put(chat_key(body(text), "bench", "default"), answer(i), vectors[text], tier="upstream")
        served = []
        for text in queries:
            hit, _ = await cache.lookup(chat_key(body(text), "bench", "default"), Lookup())
            served.append((hit.entry.text, hit.similarity) if hit else (None, 0.0))
        await store.close()
    return served


def rate(k: int, n: int) -> dict[str, Any]:
    return {"count": k, "of": n, "rate": k / n if n else 0.0, "ci95": list(wilson(k, n))}


def qqp(data: Path, limit: int | None, cache_dir: Path) -> dict[str, Any]:
    pairs = json.loads((data / "qqp_pairs" / "pairs.json").read_text())
    if limit:
        pairs = random.Random(0).sample(pairs, limit)
    start = time.perf_counter()
    served = asyncio.run(run([p["text_a"] for p in pairs], [p["text_b"] for p in pairs], cache_dir))
    rows = []
    dups = [i for i, p in enumerate(pairs) if p["label"]]
    nons = [i for i, p in enumerate(pairs) if not p["label"]]
    for t in THRESHOLDS:

        def hit(i: int, t: float = t) -> bool:
            return served[i][0] is not None and served[i][1] >= t

        def same(i: int) -> bool:  # the stored question is the query itself, stored from another pair
            return served[i][0] == pairs[i]["text_b"]

        right = sum(1 for i in dups if hit(i) and served[i][0] == pairs[i]["text_a"])
        wrong_dup = sum(1 for i in dups if hit(i) and served[i][0] != pairs[i]["text_a"] and not same(i))
        false_non = sum(1 for i in nons if hit(i) and not same(i))
        identical = sum(1 for i in range(len(pairs)) if hit(i) and same(i))
        rows.append({"threshold": t, "hit_rate_on_duplicates": rate(right, len(dups)),
                     "false_hit_rate_on_non_duplicates": rate(false_non, len(nons)),
                     "wrong_entry_on_duplicates": rate(wrong_dup, len(dups)),
                     "precision_of_hits": rate(right, right + wrong_dup + false_non),
                     "identical_question_hits": identical})  # fmt: skip
    return {"file": "qqp_pairs/pairs.json", "pairs": len(pairs), "duplicates": len(dups), "rows": rows,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def gptcache_mock(data: Path, cache_dir: Path) -> dict[str, Any]:
    pairs = json.loads((data / "gptcache_mock" / "mock_data.json").read_text())
    served = asyncio.run(run([p["origin"] for p in pairs], [p["similar"] for p in pairs], cache_dir))
    rows = []
    for t in THRESHOLDS:
        positive = sum(1 for p, (text, s) in zip(pairs, served, strict=True) if text == p["origin"] and s >= t)
        negative = sum(1 for p, (text, s) in zip(pairs, served, strict=True)
                       if text is not None and text != p["origin"] and s >= t)  # fmt: skip
        rows.append({"threshold": t, "positive": positive, "negative": negative,
                     "miss": len(pairs) - positive - negative})  # fmt: skip
    return {
        "file": "gptcache_mock/mock_data.json",
        "pairs": len(pairs),
        "rows": rows,
        "gptcache_published": {"0.95": [425, 25, 549], "0.9": [804, 77, 118], "0.8": [904, 92, 3]},
    }


def pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:5.1f}% [{100 * lo:4.1f}-{100 * hi:4.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--limit", type=int, help="sample this many QQP pairs (seed 0)")
    parser.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "cachecade")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"machine": machine(), "embedder": f"{DEFAULT_EMBEDDER} (onnx fp32)",
              "threshold_scale": "cosine similarity in [0, 1], higher = closer", "default_threshold": DEFAULT_THRESHOLD,
              "qqp": qqp(args.data, args.limit, args.model_cache),
              "gptcache_mock": gptcache_mock(args.data, args.model_cache)}  # fmt: skip
    q = report["qqp"]
    print(f"QQP ({q['file']}, {q['pairs']} pairs, {q['duplicates']} duplicates): insert text_a, query text_b")
    print(f"{'thresh':>6}  {'hit rate (dups)':>21}  {'false hits (non-dups)':>21}  {'wrong entry (dups)':>21}  "
          f"{'precision':>21}  {'identical':>9}")  # fmt: skip
    for r in q["rows"]:
        print(f"{r['threshold']:>6.2f}  {pct(r['hit_rate_on_duplicates']):>21}  "
              f"{pct(r['false_hit_rate_on_non_duplicates']):>21}  {pct(r['wrong_entry_on_duplicates']):>21}  "
              f"{pct(r['precision_of_hits']):>21}  {r['identical_question_hits']:>9}")  # fmt: skip
    g = report["gptcache_mock"]
    print(f"\nGPTCache mock ({g['file']}, {g['pairs']} pairs): positive / negative / miss (GPTCache published)")
    for r in g["rows"]:
        published = g["gptcache_published"].get(str(r["threshold"]).rstrip("0"), "")
        print(f"{r['threshold']:>6.2f}  {r['positive']:>4} / {r['negative']:>3} / {r['miss']:>4}   {published}")
    print(f"\nwrote {write_json('cache_quality', report, args.out)}")


if __name__ == "__main__":
    main()
