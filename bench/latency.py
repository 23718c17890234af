"""End-to-end latency of the proxy with real processes: llama_cpp.server on SmolLM2 as the upstream and
`cachecade serve` in front of it, both started here and stopped at the end.

Measures, in one run:
  * exact-hit latency at concurrency 1 (repeats of seeded requests),
  * semantic-hit latency at concurrency 1 and at --concurrency (QQP paraphrases of seeded requests),
  * miss overhead: proxy miss latency minus direct upstream latency, interleaved in the same run (with a
    proxied BYPASS, Cache-Control: no-cache, no-store, to split forwarding from cache work),
  * the embedder alone, in-process (the same ONNX embedder the proxy uses),
and checks the latency targets. Prints a table and writes JSON (bench/results/latency.json by default).

  HF_HUB_OFFLINE=1 .venv/bin/python -m bench.latency [--data ../shared/data] [--pairs 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import RESULTS, machine, percentile, say
from cache.embedder import DEFAULT_EMBEDDER, load_embedder
from local_models.processes import ServerFailed, free_port, start_llama_server, stop, wait_until_up
from local_models.registry import smollm2_gguf
from proxy.config import DEFAULT_THRESHOLD

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path.home() / ".cache" / "cachecade"
API_KEY = "sk-cachecade-bench-latency"  # one key for every request: one tenant
GENERATION = {"model": "smollm2", "temperature": 0, "max_tokens": 16, "stop": [" ", "\n"]}
SERIAL_REQUESTS = 300
EMBED_SAMPLES = 200
MAX_SIMILAR = 0.999  # pairs at or above this are (near-)identical strings, not paraphrases
TARGETS = {"semantic_hit_p50_ms_c1": 15.0, "exact_hit_p50_ms": 3.0, "miss_overhead_p50_extra_ms": 2.0}


class BenchError(RuntimeError):
    """A run that cannot give meaningful numbers."""


# --- processes -------------------------------------------------------------------------------------------


def start_upstream(workdir: Path, threads: int) -> tuple[subprocess.Popen, str, Path]:
    log = workdir / "llama-server.log"
    process, v1 = start_llama_server(smollm2_gguf(), "smollm2", log, threads=threads, wait=False)
    return process, v1.removesuffix("/v1"), log


def start_proxy(
    workdir: Path, upstream_v1: str, threshold: float, extra: dict[str, str]
) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = workdir / "cachecade.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECADE_")}
    env |= {"CACHECADE_UPSTREAM_BASE_URL": upstream_v1, "CACHECADE_DATA_DIR": str(data_dir),
            "CACHECADE_MODEL_CACHE_DIR": str(MODEL_CACHE), "CACHECADE_LOG_LEVEL": "warning",
            "CACHECADE_CACHE_THRESHOLD": repr(threshold), "HF_HUB_OFFLINE": "1", **extra}  # fmt: skip
    if not upstream_v1:  # the embedded default: no upstream
        del env["CACHECADE_UPSTREAM_BASE_URL"]
    script = Path(sys.executable).parent / "cachecade"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]
    cmd = [*launcher, "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}", log


# --- data -------------------------------------------------------------------------------------------------


@dataclass
class Queries:
    pairs: list[tuple[str, str, float]]  # (text_a, text_b, cosine)
    examined: int  # duplicate pairs embedded to find them
    miss_prompts: list[tuple[str, str, str]] = field(default_factory=list)  # (direct, miss, bypass)


def read_pairs(data: Path) -> tuple[Path, list[dict[str, Any]]]:
    path = data / "qqp_pairs" / "pairs.json"
    if not path.is_file():
        raise BenchError(f"no QQP pairs at {path}: pass --data DIR containing qqp_pairs/pairs.json")
    return path, json.loads(path.read_text())


def select_pairs(rows: list[dict[str, Any]], embedder: Any, count: int, threshold: float) -> Queries:
    """Duplicates whose cosine is in [threshold, MAX_SIMILAR): paraphrases the proxy should serve semantically."""
    duplicates = [r for r in rows if int(r["label"]) == 1 and r["text_a"].strip() and r["text_b"].strip()]
    random.Random(0).shuffle(duplicates)
    kept: list[tuple[str, str, float]] = []
    seen: set[str] = set()
    examined = 0
    for start in range(0, len(duplicates), 256):
        chunk = duplicates[start : start + 256]
        examined += len(chunk)
        a = embedder.encode([r["text_a"] for r in chunk])
        b = embedder.encode([r["text_b"] for r in chunk])
        for row, cosine in zip(chunk, (a * b).sum(axis=1), strict=True):
            text_a, text_b = row["text_a"], row["text_b"]
            if threshold <= cosine < MAX_SIMILAR and text_a not in seen and text_b not in seen and text_a != text_b:
                kept.append((text_a, text_b, float(cosine)))
                seen |= {text_a, text_b}
                if len(kept) == count:
                    return Queries(kept, examined)
    if not kept:
        raise BenchError(f"no duplicate pair has cosine in [{threshold}, {MAX_SIMILAR})")
    return Queries(kept, examined)


def select_miss_prompts(
    rows: list[dict[str, Any]], embedder: Any, used: Sequence[str], samples: int, threshold: float
) -> list[tuple[str, str, str]]:
    """Triples of distinct questions (direct, proxied miss, proxied bypass) of the same length in embedder tokens,
    none within reach of the cache threshold of any other selected or already-used text (so each really misses)."""
    used_set = set(used)
    pool: list[str] = []
    seen: set[str] = set()
    candidates = [r for r in rows if int(r["label"]) == 0]
    random.Random(1).shuffle(candidates)
    for row in candidates:
        text = row["text_a"]  # one question per row: distinct rows
        if text.strip() and text not in used_set and text not in seen and 3 <= len(text.split()) <= 25:
            pool.append(text)
            seen.add(text)
        if len(pool) >= 10 * samples + 300:
            break
    vectors = embedder.encode(pool)
    tokens = embedder.count_tokens(pool)
    chosen = embedder.encode(list(used)) if used else np.zeros((0, vectors.shape[1]), dtype=np.float32)
    by_length: dict[int, list[str]] = {}
    groups: list[tuple[str, str, str]] = []
    margin = threshold - 0.05  # keep well clear of the threshold
    for i, text in enumerate(pool):
        if chosen.shape[0] and float((chosen @ vectors[i]).max()) >= margin:
            continue
        chosen = np.vstack([chosen, vectors[i : i + 1]])
        waiting = by_length.setdefault(tokens[i], [])
        waiting.append(text)
        if len(waiting) == 3:
            groups.append((waiting[0], waiting[1], waiting[2]))
            waiting.clear()
            if len(groups) == samples:
                return groups
    raise BenchError(f"only {len(groups)} same-length miss prompt groups found; lower --miss-samples")


# --- measurement ------------------------------------------------------------------------------------------


def body(text: str) -> dict[str, Any]:
    return {**GENERATION, "messages": [{"role": "user", "content": text}]}


@dataclass
class Sample:
    ms: float
    cache: str
    finish: str | None
    similarity: float | None
    served_by: str
    completion_tokens: int | None
    prompt_tokens: int | None
    threshold: float | None


async def send(client: httpx.AsyncClient, base: str, text: str, headers: dict[str, str] | None = None) -> Sample:
    started = time.perf_counter()
    response = await client.post(f"{base}/v1/chat/completions", json=body(text), headers=headers)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise BenchError(f"{base} answered {response.status_code} to {text!r}: {response.text[:500]}")
    payload = response.json()
    usage = payload.get("usage") or {}
    similarity = response.headers.get("x-cache-similarity")
    threshold = response.headers.get("x-cache-threshold")
    return Sample(
        ms=elapsed, cache=response.headers.get("x-cache", "NONE"), finish=payload["choices"][0].get("finish_reason"),
        similarity=float(similarity) if similarity else None, served_by=response.headers.get("x-served-by", "-"),
        completion_tokens=usage.get("completion_tokens"), prompt_tokens=usage.get("prompt_tokens"),
        threshold=float(threshold) if threshold else None,
    )  # fmt: skip


def summary(samples: list[Sample], wall_s: float, concurrency: int) -> dict[str, Any]:
    ms = [s.ms for s in samples]
    similarities = [s.similarity for s in samples if s.similarity is not None and s.cache == "HIT-SEMANTIC"]
    return {
        "requests": len(samples), "concurrency": concurrency,
        "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(float(np.mean(ms)), 3), "max_ms": round(max(ms), 3),
        "throughput_rps": round(len(samples) / wall_s, 1), "wall_s": round(wall_s, 3),
        "x_cache": dict(Counter(s.cache for s in samples)), "x_served_by": dict(Counter(s.served_by for s in samples)),
        "semantic_similarity_min": round(min(similarities), 4) if similarities else None,
    }  # fmt: skip


def cpu_seconds(pids: dict[str, int]) -> dict[str, float | None]:
    """CPU time (user + system, seconds) of this process ("bench client") and of the given processes (Linux)."""
    out: dict[str, float | None] = {"bench_client": time.process_time()}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (all threads)
        except (OSError, IndexError, ValueError):
            out[name] = None
    return out


async def run_phase(client: httpx.AsyncClient, base: str, texts: Sequence[str], total: int, concurrency: int,
                    pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    """`total` requests cycling over `texts`, from `concurrency` workers sharing one counter. Also the CPU time
    each process spent per request, to see where the time goes on a small machine."""
    samples: list[Sample] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            samples.append(await send(client, base, texts[i % len(texts)]))

    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    cpu_after = cpu_seconds(pids)
    result = summary(samples, wall, concurrency)
    result["cpu_ms_per_request"] = {
        name: round((after - before) * 1000 / total, 3) if after is not None and before is not None else None
        for name, before, after in ((n, cpu_before[n], cpu_after[n]) for n in cpu_before)
    }
    return result


async def seed(client: httpx.AsyncClient, proxy: str, pairs: list[tuple[str, str, float]]) -> dict[str, Any]:
    """Send each text_a (misses that store), then repeat each once: every repeat must be HIT-EXACT."""
    firsts = [await send(client, proxy, a) for a, _, _ in pairs]
    repeats = [await send(client, proxy, a) for a, _, _ in pairs]
    bad = [(a, f.cache, f.finish, r.cache) for (a, _, _), f, r in zip(pairs, firsts, repeats, strict=True)
           if r.cache != "HIT-EXACT"]  # fmt: skip
    if bad:
        detail = "\n".join(f"  {t!r}: first {c} finish_reason={fr}, repeat {rc}" for t, c, fr, rc in bad[:10])
        raise BenchError(
            f"{len(bad)} of {len(pairs)} seeded requests were not stored (a repeat was not HIT-EXACT); only complete "
            f"answers (finish_reason 'stop') are cached:\n{detail}"
        )
    return {
        "first": dict(Counter(s.cache for s in firsts)),
        "finish_reason": dict(Counter(str(s.finish) for s in firsts)),
        "completion_tokens_mean": round(float(np.mean([s.completion_tokens or 0 for s in firsts])), 2),
        "miss_p50_ms": round(percentile([s.ms for s in firsts], 50), 3),
        "thresholds_seen": sorted({s.threshold for s in firsts if s.threshold is not None}),
    }


async def miss_overhead(
    proxy_client: httpx.AsyncClient, upstream_client: httpx.AsyncClient, proxy: str, upstream: str,
    prompts: list[tuple[str, str, str]],
) -> dict[str, Any]:  # fmt: skip
    """Per iteration: one direct upstream request, one proxied miss (looked up, then stored) and one proxied bypass
    (Cache-Control: no-cache, no-store: forwarding only), each a different prompt of the same length; which goes
    first rotates every iteration. Iterations whose proxied miss was not a MISS are left out and counted."""
    bypass_headers = {"Cache-Control": "no-cache, no-store"}
    kept: list[dict[str, Sample]] = []
    not_miss: Counter[str] = Counter()
    for i, (direct_text, miss_text, bypass_text) in enumerate(prompts):
        calls = [("direct", lambda t=direct_text: send(upstream_client, upstream, t)),
                 ("miss", lambda t=miss_text: send(proxy_client, proxy, t)),
                 ("bypass", lambda t=bypass_text: send(proxy_client, proxy, t, bypass_headers))]  # fmt: skip
        calls = calls[i % 3 :] + calls[: i % 3]
        got = {name: await call() for name, call in calls}
        if got["miss"].cache != "MISS":
            not_miss[got["miss"].cache] += 1
            continue
        kept.append(got)
    if not kept:
        raise BenchError(f"no proxied request missed: {dict(not_miss)}")

    def ms(name: str) -> list[float]:
        return [g[name].ms for g in kept]

    def tokens(name: str, which: str) -> float:
        return round(float(np.mean([getattr(g[name], f"{which}_tokens") or 0 for g in kept])), 2)

    miss_diff = [g["miss"].ms - g["direct"].ms for g in kept]
    bypass_diff = [g["bypass"].ms - g["direct"].ms for g in kept]
    cache_work = [g["miss"].ms - g["bypass"].ms for g in kept]
    # Iterations where the upstream saw the same token counts for the direct and the missed prompt.
    same = [d for g, d in zip(kept, miss_diff, strict=True) if g["direct"].prompt_tokens == g["miss"].prompt_tokens
            and g["direct"].completion_tokens == g["miss"].completion_tokens]  # fmt: skip
    return {
        "samples": len(kept), "not_miss": dict(not_miss),
        "bypass_x_cache": dict(Counter(g["bypass"].cache for g in kept)),
        "direct_p50_ms": round(percentile(ms("direct"), 50), 3), "proxy_p50_ms": round(percentile(ms("miss"), 50), 3),
        "bypass_p50_ms": round(percentile(ms("bypass"), 50), 3),
        "direct_mean_ms": round(float(np.mean(ms("direct"))), 3), "proxy_mean_ms": round(float(np.mean(ms("miss"))), 3),
        "bypass_mean_ms": round(float(np.mean(ms("bypass"))), 3),
        "overhead_p50_ms": round(percentile(miss_diff, 50), 3), "overhead_mean_ms": round(float(np.mean(miss_diff)), 3),
        "bypass_overhead_p50_ms": round(percentile(bypass_diff, 50), 3),
        "bypass_overhead_mean_ms": round(float(np.mean(bypass_diff)), 3),
        "miss_minus_bypass_p50_ms": round(percentile(cache_work, 50), 3),
        "overhead_p50_same_tokens_ms": round(percentile(same, 50), 3) if same else None,
        "same_token_pairs": len(same),
        **{f"{n}_{w}_tokens_mean": tokens(n, w) for n in ("direct", "miss", "bypass")
           for w in ("prompt", "completion")},
    }  # fmt: skip


def embed_latency(embedder: Any, texts: Sequence[str], samples: int) -> dict[str, Any]:
    for text in texts[:10]:  # warm-up
        embedder.encode([text])
    ms = []
    for i in range(samples):
        started = time.perf_counter()
        embedder.encode([texts[i % len(texts)]])
        ms.append((time.perf_counter() - started) * 1000)
    return {"samples": samples, "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(float(np.mean(ms)), 3)}  # fmt: skip


# --- report -----------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    f = report["figures"]
    lines = [
        f"cachecade latency  ({report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
        f"Python {report['machine']['python']}; 1-min load {report['machine']['load_average_1m_before']} before, "
        f"{report['machine']['load_average_1m_after']} after)",
        f"dataset {report['dataset']['file']}: {report['dataset']['pairs_used']} paraphrase pairs "
        f"(cosine in [{report['threshold']}, {MAX_SIMILAR}), mean {report['dataset']['pair_cosine_mean']}), "
        f"threshold {report['threshold']}",
        "",
        f"{'phase':<26}{'conc':>5}{'reqs':>6}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'req/s':>8}  x-cache",
    ]
    for name, key in (("exact hit", "exact_hit_c1"), ("semantic hit", "semantic_hit_c1"),
                      ("semantic hit", "semantic_hit_concurrent")):  # fmt: skip
        s = f[key]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(s["x_cache"].items()))
        lines.append(f"{name:<26}{s['concurrency']:>5}{s['requests']:>6}{s['p50_ms']:>9.2f}{s['p99_ms']:>9.2f}"
                     f"{s['mean_ms']:>9.2f}{s['throughput_rps']:>8.1f}  {counts}")  # fmt: skip
    lines += ["", "CPU ms per request (all threads)    bench client      proxy   upstream"]
    concurrency = f["semantic_hit_concurrent"]["concurrency"]
    for name, key in (("exact hit c=1", "exact_hit_c1"), ("semantic hit c=1", "semantic_hit_c1"),
                      (f"semantic hit c={concurrency}", "semantic_hit_concurrent")):  # fmt: skip
        cpu = {k: "-" if v is None else f"{v:.2f}" for k, v in f[key]["cpu_ms_per_request"].items()}
        lines.append(f"  {name:<34}{cpu['bench_client']:>12}{cpu['proxy']:>11}{cpu['upstream']:>11}")
    m, e = f["miss"], f["embedder"]
    lines += [
        "",
        f"miss overhead ({m['samples']} interleaved iterations, not-MISS left out: {m['not_miss'] or 'none'})",
        f"  direct upstream          p50 {m['direct_p50_ms']:8.2f} ms   mean {m['direct_mean_ms']:8.2f} ms"
        f"   tokens prompt {m['direct_prompt_tokens_mean']}, completion {m['direct_completion_tokens_mean']}",
        f"  through proxy, MISS      p50 {m['proxy_p50_ms']:8.2f} ms   mean {m['proxy_mean_ms']:8.2f} ms"
        f"   tokens prompt {m['miss_prompt_tokens_mean']}, completion {m['miss_completion_tokens_mean']}",
        f"  through proxy, BYPASS    p50 {m['bypass_p50_ms']:8.2f} ms   mean {m['bypass_mean_ms']:8.2f} ms"
        f"   tokens prompt {m['bypass_prompt_tokens_mean']}, completion {m['bypass_completion_tokens_mean']}",
        f"  MISS - direct (per it.)  p50 {m['overhead_p50_ms']:8.2f} ms   mean {m['overhead_mean_ms']:8.2f} ms"
        f"   (same-token iterations: p50 {m['overhead_p50_same_tokens_ms']} ms over {m['same_token_pairs']})",
        f"  BYPASS - direct          p50 {m['bypass_overhead_p50_ms']:8.2f} ms   mean "
        f"{m['bypass_overhead_mean_ms']:8.2f} ms   (forwarding only)",
        f"  MISS - BYPASS            p50 {m['miss_minus_bypass_p50_ms']:8.2f} ms   (lookup + embedding + store)",
        f"embedder in-process        p50 {e['p50_ms']:8.2f} ms   p99 {e['p99_ms']:.2f} ms   "
        f"({e['samples']} x encode([question]))",
        f"seeding: {f['seed']['first']}, finish_reason {f['seed']['finish_reason']}, miss p50 "
        f"{f['seed']['miss_p50_ms']} ms",
        "",
        "targets",
    ]
    for t in report["targets"].values():
        lines.append(f"  {t['name']:<44} {t['value']:8.2f} <= {t['limit']:<8.2f} {'MET' if t['met'] else 'NOT MET'}")
    return "\n".join(lines)


async def measure(args: argparse.Namespace, proxy: str, upstream: str, queries: Queries, embedder: Any,
                  pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(limits=limits, timeout=timeout) as direct:  # fmt: skip
        texts_a = [a for a, _, _ in queries.pairs]
        texts_b = [b for _, b, _ in queries.pairs]
        figures: dict[str, Any] = {"seed": await seed(client, proxy, queries.pairs)}
        say(f"seeded {len(texts_a)} entries: {figures['seed']}")
        figures["exact_hit_c1"] = await run_phase(client, proxy, texts_a, SERIAL_REQUESTS, 1, pids)
        say("exact hits done")
        for text in texts_b[:5]:  # warm the semantic path once (not counted)
            await send(client, proxy, text)
        figures["semantic_hit_c1"] = await run_phase(client, proxy, texts_b, SERIAL_REQUESTS, 1, pids)
        say("semantic hits at concurrency 1 done")
        figures["semantic_hit_concurrent"] = await run_phase(
            client, proxy, texts_b, args.requests, args.concurrency, pids
        )
        say(f"semantic hits at concurrency {args.concurrency} done; measuring misses")
        for text in ("Hello?", "What is two plus two?"):  # warm the upstream's direct connection
            await send(direct, upstream, text)
        figures["miss"] = await miss_overhead(client, direct, proxy, upstream, queries.miss_prompts)
    say("misses done; timing the embedder in-process")
    questions = [q for group in queries.miss_prompts for q in group]
    figures["embedder"] = embed_latency(embedder, questions, EMBED_SAMPLES)
    return figures


def targets(figures: dict[str, Any]) -> dict[str, Any]:
    embed_p50 = figures["embedder"]["p50_ms"]
    rows = {
        "semantic_hit_p50_c1": ("semantic hit p50 at c=1 (ms)", figures["semantic_hit_c1"]["p50_ms"],
                                TARGETS["semantic_hit_p50_ms_c1"]),
        "exact_hit_p50": ("exact hit p50 at c=1 (ms)", figures["exact_hit_c1"]["p50_ms"], TARGETS["exact_hit_p50_ms"]),
        "miss_overhead_p50": ("miss overhead p50 <= embed p50 + 2 ms (ms)", figures["miss"]["overhead_p50_ms"],
                              round(embed_p50 + TARGETS["miss_overhead_p50_extra_ms"], 3)),
    }  # fmt: skip
    return {k: {"name": n, "value": v, "limit": lim, "met": bool(v <= lim)} for k, (n, v, lim) in rows.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                   help="data directory holding qqp_pairs/pairs.json (default ../shared/data)")  # fmt: skip
    p.add_argument("--pairs", type=int, default=64, help="paraphrase pairs to seed and query (default 64)")
    p.add_argument("--miss-samples", type=int, default=100, help="interleaved direct/proxied miss pairs (100)")
    p.add_argument("--requests", type=int, default=1000, help="requests of the concurrent semantic phase (1000)")
    p.add_argument("--concurrency", type=int, default=32, help="workers of the concurrent semantic phase (32)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"cache threshold given to the proxy (default {DEFAULT_THRESHOLD})")  # fmt: skip
    p.add_argument("--upstream-threads", type=int, default=1,
                   help="llama.cpp threads of the upstream (default 1: the other core is the proxy's, as if the "
                   "upstream ran elsewhere)")  # fmt: skip
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="CACHECADE_NAME=VALUE",
                   help="extra proxy setting (repeatable)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "latency.json", help="JSON report path")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.miss_samples < 1 or args.requests < 1 or args.concurrency < 1:
        p.error("--pairs, --miss-samples, --requests and --concurrency must be positive")
    return args


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("CACHECADE_"):
        raise argparse.ArgumentTypeError("expected CACHECADE_NAME=VALUE")
    return name, value


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = time.monotonic()
    dataset, rows = read_pairs(args.data)
    say("loading the embedder (the first run exports it to ONNX, ~15 s)")
    embedder = load_embedder(DEFAULT_EMBEDDER, "onnx", MODEL_CACHE)
    processes: list[subprocess.Popen] = []
    logs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="cachecade-bench-") as tmp:
        workdir = Path(tmp)
        try:
            llama, upstream, llama_log = start_upstream(workdir, args.upstream_threads)
            processes.append(llama)
            logs.append(llama_log)
            proxy_process, proxy, proxy_log = start_proxy(workdir, f"{upstream}/v1", args.threshold, dict(args.set))
            processes.append(proxy_process)
            logs.append(proxy_log)
            # Choose the queries while the servers start.
            queries = select_pairs(rows, embedder, args.pairs, args.threshold)
            used = [t for a, b, _ in queries.pairs for t in (a, b)]
            queries.miss_prompts = select_miss_prompts(rows, embedder, used, args.miss_samples, args.threshold)
            say(
                f"{len(queries.pairs)} paraphrase pairs from {queries.examined} duplicates examined; "
                f"{len(queries.miss_prompts)} miss prompt groups"
            )
            wait_until_up(f"{upstream}/v1/models", llama, llama_log)
            wait_until_up(f"{proxy}/readyz", proxy_process, proxy_log)
            say(f"upstream {upstream} and proxy {proxy} are up")
            pids = {"proxy": proxy_process.pid, "upstream": llama.pid}
            load_before = os.getloadavg()
            figures = asyncio.run(measure(args, proxy, upstream, queries, embedder, pids))
            load_after = os.getloadavg()
        except BaseException:
            for log in logs:
                if log.exists():
                    print(f"--- tail of {log.name} ---\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise
        finally:
            for process in reversed(processes):
                stop(process)
            say("servers stopped")
    report = {
        "benchmark": "latency",
        "machine": {
            **machine(),
            # other work on the machine skews every figure; the 1-minute load before and after measuring
            "load_average_1m_before": round(load_before[0], 2),
            "load_average_1m_after": round(load_after[0], 2),
        },
        "dataset": {
            "file": str(dataset),
            "pairs_used": len(queries.pairs),
            "duplicates_examined": queries.examined,
            "pair_cosine_mean": round(float(np.mean([c for _, _, c in queries.pairs])), 4),
            "miss_prompt_groups": len(queries.miss_prompts),
        },
        "threshold": args.threshold,
        "generation": GENERATION,
        "settings": {
            "serial_requests": SERIAL_REQUESTS,
            "concurrent_requests": args.requests,
            "concurrency": args.concurrency,
            "embed_samples": EMBED_SAMPLES,
            "upstream": f"llama_cpp.server SmolLM2 --n_ctx 2048 --n_threads {args.upstream_threads}",
            "proxy_settings": dict(args.set),
        },
        "figures": figures,
        "targets": targets(figures),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print()
    print(render(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out} ({report['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (BenchError, ServerFailed) as exc:
        print(f"bench.latency: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
