"""The verified semantic cache against cosine alone, on pairs the verifier never trained on.

- QQP, pair by pair: the held-out pairs of `cachecade train-verifier`'s split (same seed) that did not pick the
  threshold (the "report" half). Cosine alone at the shipped 0.95 and at the threshold that keeps false hits at
  1 % on these pairs (an optimistic cosine: chosen on the very pairs it is scored on), against the verified rule
  (cosine >= band, probability >= the shipped threshold). 95 % Wilson intervals.
- Word swaps: made by the generators from held-out questions with another seed than training's (the same kinds
  of change on questions it never saw), with their meaning-preserving counterparts (conjuncts swapped, a
  trailing phrase fronted).
- GPTCache's mock pairs: positives are its 999 (origin, similar) pairs, negatives each origin against the next
  pair's similar, as in bench/cache_quality.
- Trivial variants through the API: 200 held-out questions stored through the app (ASGI, a fake upstream), then
  asked again in another form (case, punctuation, spacing, contractions, wrappers): share served.
- GPTCache's protocol at the cache level: its distinct origins stored, each `similar` asked (positive: its own
  origin served, negative: another), cosine alone at its three thresholds against the verified rule, beside
  GPTCache's published table.
- Latency: word swaps and their counterparts asked through the app with the verifier on and off (the first
  text stored, the second asked): the verifier's own time per lookup that reached it (the app's Server-Timing
  header), what those requests cost, and the difference on/off. Lookups below the band never reach the
  verifier.

  python -m bench.verifier --data ../shared/data [--variants 200] [--latency 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import machine, percentile, say, write_report
from cache.calibration import wilson
from cache.embedder import load_embedder
from cache.verifier import PairVerifier
from cache.verifier_data import Pair, generated_pairs, read_pairs, split_of, surface_variant
from cache.verifier_training import pick_threshold


def served_rates(served: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    pos, neg = labels == 1, labels == 0
    hits, false_hits = int(served[pos].sum()), int(served[neg].sum())
    return {"hit_rate": hits / max(1, pos.sum()), "hit_ci": wilson(hits, int(pos.sum())),
            "false_hit_rate": false_hits / max(1, neg.sum()), "false_hit_ci": wilson(false_hits, int(neg.sum())),
            "positives": int(pos.sum()), "negatives": int(neg.sum())}  # fmt: skip


def compare(pairs: list[Pair], verifier: PairVerifier, embed: Any, cosine_fh: float | None = 0.01) -> dict[str, Any]:
    labels = np.array([p.label for p in pairs])
    cosine = (embed([p.a for p in pairs]) * embed([p.b for p in pairs])).sum(axis=1)
    probability = np.concatenate([verifier.score([(p.a, p.b) for p in pairs[i : i + 64]])
                                  for i in range(0, len(pairs), 64)])  # fmt: skip
    meta = verifier.meta
    out = {"cosine_0.95": served_rates(cosine >= 0.95, labels),
           "verified": served_rates((cosine >= meta.band_low) & (probability >= meta.threshold), labels)}  # fmt: skip
    if cosine_fh is not None and (labels == 0).any():
        best = pick_threshold(cosine, np.ones_like(cosine), labels, 0.0, cosine_fh)
        out[f"cosine_at_{cosine_fh:.0%}_false_hits ({best:.3f})"] = served_rates(cosine >= best, labels)
    return out


async def through_api(questions: list[str], probes: list[Pair], verifier: PairVerifier, embedder: Any,
                      n_latency: int, cache_dir: Path) -> dict[str, Any]:  # fmt: skip
    """Variants served through the app, and the latency of lookups the model decides: each probe's first text is
    stored, its second asked (word swaps and their meaning-preserving counterparts: no canonical match)."""
    from proxy.app import create_app
    from proxy.config import Settings

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}})  # fmt: skip

    def chat(text: str) -> dict[str, Any]:
        return {"model": "m", "messages": [{"role": "user", "content": text}]}

    rng = random.Random(7)
    out: dict[str, Any] = {}
    for mode in ("on", "off"):
        with tempfile.TemporaryDirectory() as data:
            settings = Settings(
                data_dir=Path(data),
                upstream_base_url="http://up.test/v1",
                cascade_routes={},
                model_cache_dir=cache_dir,
                cache_verifier="default" if mode == "on" else "off",
            )
            app = create_app(settings, embedder=embedder, upstream_transport=httpx.MockTransport(upstream),
                             verifier=verifier if mode == "on" else None)  # fmt: skip
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            async with app.router.lifespan_context(app), client:
                for q in questions:
                    await client.post("/v1/chat/completions", json=chat(q))
                variants = [surface_variant(q, rng) for q in questions]
                results = [await client.post("/v1/chat/completions", json=chat(v)) for v in variants]
                hits = sum(r.headers["x-cache"].startswith("HIT") for r in results)
                for probe in probes[:n_latency]:
                    await client.post("/v1/chat/completions", json=chat(probe.a))
                timings, decided, verifier_ms = [], [], []
                for probe in probes[:n_latency]:
                    started = time.perf_counter()
                    r = await client.post("/v1/chat/completions", headers={"cache-control": "no-store"},
                                          json=chat(probe.b))  # fmt: skip
                    timings.append((time.perf_counter() - started) * 1000)
                    spent = server_timing(r.headers.get("server-timing", "")).get("verifier")
                    decided.append(spent is not None)
                    if spent is not None:
                        verifier_ms.append(spent)
            by_model = [t for t, d in zip(timings, decided, strict=True) if d]
            out[mode] = {"variant_hit_rate": hits / len(variants), "variant_hit_ci": wilson(hits, len(variants)),
                         "probe_p50_ms": statistics.median(timings), "probe_p99_ms": percentile(timings, 99),
                         "decided_by_model": len(by_model),
                         "decided_p50_ms": statistics.median(by_model) if by_model else None,
                         "decided_p99_ms": percentile(by_model, 99) if by_model else None,
                         "verifier_p50_ms": statistics.median(verifier_ms) if verifier_ms else None,
                         "verifier_p99_ms": percentile(verifier_ms, 99) if verifier_ms else None}  # fmt: skip
    return out


def server_timing(header: str) -> dict[str, float]:
    """{name: milliseconds} from a Server-Timing header ("cache;dur=1.2, verifier;dur=0.8")."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def gptcache_cache_level(mock: list[dict[str, str]], verifier: PairVerifier, embed: Any, top_k: int = 4
                         ) -> dict[str, Any]:  # fmt: skip
    """GPTCache's own protocol at the cache level: the distinct origins stored, each `similar` asked; positive =
    its own origin served, negative = another one served. Cosine alone at GPTCache's thresholds (today's rule)
    against the verified rule (the top-k at or above the band, best-first, the first accepted served)."""
    origins = sorted({m["origin"] for m in mock})
    stored = np.concatenate([embed(origins[i : i + 256]) for i in range(0, len(origins), 256)])
    asked = np.concatenate([embed([m["similar"] for m in mock[i : i + 256]]) for i in range(0, len(mock), 256)])
    similarity = asked @ stored.T
    order = np.argsort(-similarity, axis=1)[:, :top_k]

    def count(served: list[str | None]) -> dict[str, int]:
        positive = sum(s == m["origin"] for s, m in zip(served, mock, strict=True))
        negative = sum(s is not None and s != m["origin"] for s, m in zip(served, mock, strict=True))
        return {"positive": positive, "negative": negative, "miss": len(mock) - positive - negative}

    out = {f"cosine {t:.2f}": count([origins[order[i, 0]] if similarity[i, order[i, 0]] >= t else None
                                     for i in range(len(mock))]) for t in (0.80, 0.90, 0.95)}  # fmt: skip
    band, needed, served = verifier.meta.band_low, verifier.meta.threshold, []
    for i, m in enumerate(mock):
        candidates = [origins[j] for j in order[i] if similarity[i, j] >= band]
        choice = None
        for group in (candidates[:1], candidates[1:]):  # as ResponseCache: the nearest first, then the rest
            scores = verifier.score([(m["similar"], c) for c in group]) if group else np.zeros(0)
            choice = next((c for c, p in zip(group, scores, strict=True) if p >= needed), None)
            if choice is not None:
                break
        served.append(choice)
    out["verified (shipped default)"] = count(served)
    out["gptcache published 0.80"] = {"positive": 904, "negative": 92, "miss": 3}
    out["gptcache published 0.90"] = {"positive": 804, "negative": 77, "miss": 118}
    out["gptcache published 0.95"] = {"positive": 425, "negative": 25, "miss": 549}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--seed", type=int, default=0, help="the seed train-verifier used (its split)")
    parser.add_argument("--variants", type=int, default=200)
    parser.add_argument("--latency", type=int, default=300)
    parser.add_argument("--backend", default="onnx-int8", choices=["onnx-int8", "onnx"], help="the verifier's")
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "cachecade"))
    args = parser.parse_args()
    data, cache_dir = Path(args.data), Path(args.model_cache)
    embedder = load_embedder("all-MiniLM-L6-v2", "onnx", cache_dir)
    verifier = PairVerifier.load(None, cache_dir, backend=args.backend)
    report: dict[str, Any] = {"machine": machine(), "verifier": verifier.model_id, "threshold": verifier.meta.threshold,
                              "band_low": verifier.meta.band_low}  # fmt: skip
    qqp = read_pairs(data / "qqp_pairs" / "pairs.json")
    held = [p for p in qqp if split_of(p, args.seed) == "validation" and split_of(p, args.seed + 1, 0.5) != "train"]
    say(f"QQP held-out report half: {len(held)} pairs")
    report["qqp"] = compare(held, verifier, embedder.encode)
    questions = sorted({t for p in held for t in (p.a, p.b)})
    made = generated_pairs(questions, args.seed + 3)
    swaps = [p for p in made if p.source in ("word-swap", "reorder")]
    say(f"word swaps: {sum(p.label == 0 for p in swaps)} swaps, {sum(p.label for p in swaps)} counterparts")
    report["word_swaps"] = compare(swaps, verifier, embedder.encode, cosine_fh=None)
    mock = json.loads((data / "gptcache_mock" / "mock_data.json").read_text())
    gptcache = [Pair(m["origin"], m["similar"], 1) for m in mock]
    gptcache += [Pair(m["origin"], mock[(i + 1) % len(mock)]["similar"], 0) for i, m in enumerate(mock)]
    report["gptcache_mock"] = compare(gptcache, verifier, embedder.encode, cosine_fh=None)
    report["gptcache_cache_level"] = gptcache_cache_level(mock, verifier, embedder.encode)
    rng = random.Random(args.seed + 4)
    sample = rng.sample([q for q in questions if len(q) > 15], args.variants)
    say(f"through the app: {len(sample)} stored questions and their variants, {args.latency} timed hits")
    probes = random.Random(args.seed + 5).sample(swaps, min(args.latency, len(swaps)))
    report["api"] = asyncio.run(through_api(sample, probes, verifier, embedder, args.latency, cache_dir))
    write_report("verifier", report, table(report))


def table(r: dict[str, Any]) -> str:
    lines = [f"machine: {r['machine']}", f"verifier {r['verifier']}: probability >= {r['threshold']:.3f} from "
             f"cosine {r['band_low']:.2f}", f"{'set / rule':<58} {'hits':>16} {'false hits':>18}"]  # fmt: skip
    for name in ("qqp", "word_swaps", "gptcache_mock"):
        for rule, x in r[name].items():
            hit = f"{x['hit_rate']:.1%} [{x['hit_ci'][0]:.1%}-{x['hit_ci'][1]:.1%}]" if x["positives"] else "-"
            fh = f"{x['false_hit_rate']:.2%} [{x['false_hit_ci'][0]:.2%}-{x['false_hit_ci'][1]:.2%}]" \
                if x["negatives"] else "-"  # fmt: skip
            lines.append(f"{name + ': ' + rule:<58} {hit:>16} {fh:>18}")
    for mode, x in r["api"].items():
        lines.append(f"API, verifier {mode}: trivial variants hit {x['variant_hit_rate']:.1%} "
                     f"[{x['variant_hit_ci'][0]:.1%}-{x['variant_hit_ci'][1]:.1%}]; swap probes p50 "
                     f"{x['probe_p50_ms']:.2f} ms, p99 {x['probe_p99_ms']:.2f} ms; decided by the model: "
                     f"{x['decided_by_model']}, p50 {x['decided_p50_ms'] or 0:.2f} ms, p99 "
                     f"{x['decided_p99_ms'] or 0:.2f} ms")  # fmt: skip
    lines.append("GPTCache's protocol, cache level (distinct origins stored, each similar asked): positive / "
                 "negative / miss")  # fmt: skip
    for rule, x in r["gptcache_cache_level"].items():
        lines.append(f"  {rule:<30} {x['positive']:>4} / {x['negative']:>3} / {x['miss']:>4}")
    on, off = r["api"]["on"], r["api"]["off"]
    lines.append(f"verifier's own time per lookup that reached it (Server-Timing, through the app): p50 "
                 f"{on['verifier_p50_ms'] or 0:.2f} ms, p99 {on['verifier_p99_ms'] or 0:.2f} ms")  # fmt: skip
    lines.append(f"added by the verifier (same probes, on - off): p50 {on['probe_p50_ms'] - off['probe_p50_ms']:+.2f} "
                 f"ms, p99 {on['probe_p99_ms'] - off['probe_p99_ms']:+.2f} ms")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
