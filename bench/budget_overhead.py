"""What token budgets and rate limits add to a request: the target is "budget checks add <= 1 ms p50".

Measures, per request, p50/p95/p99 over --iterations after --warmup (in one process, on the machine described
in the report, whose load average is recorded at the start and the end since the machine may be shared):

  * budget work: `Budgets.open` + `reserve` + `settle`, what the pipeline does for one upstream answer, for a
    limited key (tokens per minute, day and month and requests per minute all set, too high to refuse) and for
    an unlimited one, on `SQLiteCounters` (a temporary file) and on `RedisCounters` (a throwaway redis-server
    started here, or --redis-url, whose keys are deleted afterwards);
  * the prompt-token estimate a limited key's reservation needs (`TokenCounter.prompt_tokens` on 2-message chat
    bodies, rotating over a few questions);
  * end to end: whole requests through the real app (`create_app` over `httpx.ASGITransport`; an
    `httpx.MockTransport` upstream with a fixed answer and usage; both cache tiers off and `Cache-Control:
    no-store`, so every request is a miss that stores nothing; no cascade route, so no local model; a stub
    embedder that is never called), alternating a limited and an unlimited API key in ABBA order. The app's
    counters are SQLite (its embedded default). The overhead is the difference of the two
    p50s, shown beside the median of the paired differences.

  cd /work/main && HF_HUB_OFFLINE=1 .venv/bin/python -m bench.budget_overhead [--iterations 2000] [--warmup 200]
      [--redis-url redis://host:6379/0]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import redis.asyncio as redis

from bench.common import RESULTS, load_average, machine, percentile, write_json
from cache.counters import CounterStore, SQLiteCounters
from cache.redis_counters import RedisCounters
from proxy.app import create_app
from proxy.budget import BudgetPolicy, Budgets, KeyLimits
from proxy.config import Settings
from proxy.context import key_id
from proxy.tokens import TokenCounter

TARGET_P50_MS = 1.0
HIGH = 10**15  # limits no run comes near, so nothing is refused
LIMITS = KeyLimits(tokens_per_minute=HIGH, tokens_per_day=HIGH, tokens_per_month=HIGH, requests_per_minute=HIGH)
LIMITED, UNLIMITED = "sk-bench-budget-limited", "sk-bench-budget-unlimited"
RESERVED, SPENT = 96, 42  # prompt + max_tokens reserved, then what the upstream reported
QUESTIONS = [
    "What is the capital of France?", "How do I reverse a list in Python?", "Explain TCP slow start briefly.",
    "Give me three tips for a job interview.", "What is the boiling point of water at altitude?",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "Summarise the plot of Hamlet in a line.",
]  # fmt: skip
ANSWER = {
    "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "up-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 25, "completion_tokens": 17, "total_tokens": 42},
}  # fmt: skip


def chat_body(i: int) -> dict[str, Any]:
    """A typical small chat request: a system prompt and one question."""
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]  # fmt: skip
    return {"model": "up-model", "messages": messages, "max_tokens": 64}


def summary(ms: Sequence[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95),
            "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}  # fmt: skip


async def timed(step: Callable[[int], Awaitable[None]], iterations: int, warmup: int) -> list[float]:
    """Milliseconds of each call of step(i) after the warm-up calls."""
    gc.collect()
    samples = []
    for i in range(warmup + iterations):
        started = time.perf_counter()
        await step(i)
        if i >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return samples


async def budget_work(counters: CounterStore, iterations: int, warmup: int) -> dict[str, dict[str, float]]:
    """open + reserve + settle for the limited and the unlimited key."""
    budgets = Budgets(counters, BudgetPolicy(keys={key_id(LIMITED): LIMITS}), time.time)
    out = {}
    for name, api_key in (("limited", LIMITED), ("unlimited", UNLIMITED)):
        kid = key_id(api_key)

        async def step(_: int, kid: str = kid) -> None:
            ticket = await budgets.open(kid)
            await budgets.reserve(ticket, RESERVED)
            await budgets.settle(ticket, SPENT)

        out[name] = summary(await timed(step, iterations, warmup))
    return out


async def on_sqlite(workdir: Path, iterations: int, warmup: int) -> dict[str, Any]:
    counters = await SQLiteCounters.open(workdir / "budgets.sqlite3", time.time)
    try:
        return await budget_work(counters, iterations, warmup)
    finally:
        await counters.close()


async def on_redis(url: str, iterations: int, warmup: int) -> dict[str, Any]:
    """On the Redis at `url`, under a prefix of this run's own that is deleted afterwards."""
    client = redis.Redis.from_url(url)
    prefix = f"bench-budget-{secrets.token_hex(4)}:"
    counters = RedisCounters(client, prefix)
    try:
        return await budget_work(counters, iterations, warmup)
    finally:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
        await counters.close()


def redis_figures(url: str | None, workdir: Path, iterations: int, warmup: int) -> dict[str, Any]:
    """Budget work on Redis: --redis-url, or a redis-server started here (skipped, saying why, without one)."""
    if url is not None:
        return {"server": "--redis-url", **asyncio.run(on_redis(url, iterations, warmup))}
    from local_models.processes import ServerFailed, stop
    from tests.redis_server import start_redis

    try:
        process, url = start_redis(workdir / "redis.log")
    except ServerFailed as exc:
        return {"skipped": str(exc)}
    try:
        return {"server": "redis-server on 127.0.0.1 (started here)", **asyncio.run(on_redis(url, iterations, warmup))}
    finally:
        stop(process)


def token_estimate(iterations: int, warmup: int) -> dict[str, float]:
    counter = TokenCounter()
    bodies = [chat_body(i) for i in range(len(QUESTIONS))]
    samples = []
    for i in range(warmup + iterations):
        body = bodies[i % len(bodies)]
        started = time.perf_counter()
        counter.prompt_tokens("chat", body)
        if i >= warmup:
            samples.append((time.perf_counter() - started) * 1000)
    return summary(samples)


class UnusedEmbedder:
    """Stands in for the embedder: with both cache tiers off and no-store, nothing may embed (checked)."""

    model_id, dim, max_tokens = "bench-unused", 384, 256

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        return np.zeros((len(texts), self.dim), dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def encode_fitting(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        return list(self.encode(texts))


def check(response: httpx.Response, limited: bool) -> None:
    """Every measured request must be a 200 miss served by the upstream, with rate-limit headers iff limited."""
    h = response.headers
    if response.status_code != 200 or h.get("x-cache") != "MISS" or not h.get("x-served-by", "").startswith("upstream"):
        raise RuntimeError(f"unexpected response {response.status_code} {dict(h)}: {response.text[:300]}")
    if ("x-ratelimit-limit-tokens" in h) != limited:
        raise RuntimeError(f"rate-limit headers {'missing' if limited else 'present'}: {dict(h)}")


async def end_to_end(workdir: Path, iterations: int, warmup: int) -> dict[str, Any]:
    """Whole requests through the app, limited and unlimited keys interleaved ABBA."""
    settings = Settings(data_dir=workdir / "data", upstream_base_url="http://upstream.test/v1", cascade_routes={},
                        cache_exact_enabled=False, cache_semantic_enabled=False,
                        key_limits={key_id(LIMITED): LIMITS})  # fmt: skip
    embedder = UnusedEmbedder()
    upstream = httpx.MockTransport(lambda request: httpx.Response(200, json=ANSWER))
    app = create_app(settings, embedder=embedder, upstream_transport=upstream, engines={})
    times: dict[bool, list[float]] = {True: [], False: []}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cachecade.test") as client:

            async def one(i: int, limited: bool) -> None:
                headers = {"authorization": f"Bearer {LIMITED if limited else UNLIMITED}", "cache-control": "no-store"}
                started = time.perf_counter()
                response = await client.post("/v1/chat/completions", json=chat_body(i), headers=headers)
                elapsed = (time.perf_counter() - started) * 1000
                check(response, limited)
                if i >= warmup:
                    times[limited].append(elapsed)

            gc.collect()
            for i in range(warmup + iterations):
                for limited in (True, False) if i % 2 == 0 else (False, True):
                    await one(i, limited)
    if embedder.calls:
        raise RuntimeError(f"the embedder was called {embedder.calls} times: the path measured is not the miss path")
    paired = [a - b for a, b in zip(times[True], times[False], strict=True)]
    with_limits, without = summary(times[True]), summary(times[False])
    return {"limited": with_limits, "unlimited": without,
            "p50_difference_ms": with_limits["p50_ms"] - without["p50_ms"],
            "median_paired_difference_ms": statistics.median(paired)}  # fmt: skip


def row(what: str, s: dict[str, float]) -> str:
    return f"{what:<46} {s['n']:>6} {s['p50_ms']:>8.3f} {s['p95_ms']:>8.3f} {s['p99_ms']:>8.3f}"


def table(report: dict[str, Any]) -> str:
    load = report["load_average"]
    lines = [f"machine: {report['machine']}",
             f"load average (1/5/15 min): start {load['start']}, end {load['end']}",
             f"target: budget checks add <= {TARGET_P50_MS} ms p50 to a request",
             f"{'per request':<46} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"]  # fmt: skip
    for store in ("sqlite", "redis"):
        figures = report["budget_work"][store]
        if "skipped" in figures:
            lines.append(f"budget open+reserve+settle, {store}: skipped ({figures['skipped'].splitlines()[0]})")
            continue
        for name in ("limited", "unlimited"):
            lines.append(row(f"budget open+reserve+settle, {store}, {name}", figures[name]))
    lines.append(row("prompt-token estimate, 2-message chat", report["prompt_token_estimate"]))
    e2e, verdict = report["end_to_end"], "met" if report["target_met"] else "NOT met"
    lines += [row("whole request (app, SQLite), limited key", e2e["limited"]),
              row("whole request (app, SQLite), unlimited key", e2e["unlimited"]),
              f"added by limits: p50 difference {e2e['p50_difference_ms']:.3f} ms, median paired difference "
              f"{e2e['median_paired_difference_ms']:.3f} ms: target {verdict}"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--redis-url", default=None, help="an existing Redis (default: start redis-server here)")
    args = parser.parse_args()
    for name in [n for n in os.environ if n.startswith("CACHECADE_")]:  # the caller's settings must not leak in
        del os.environ[name]
    report: dict[str, Any] = {"machine": machine(), "load_average": {"start": load_average()},
                              "iterations": args.iterations, "warmup": args.warmup}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        workdir = Path(tmp)
        report["budget_work"] = {
            "sqlite": asyncio.run(on_sqlite(workdir, args.iterations, args.warmup)),
            "redis": redis_figures(args.redis_url, workdir, args.iterations, args.warmup),
        }
        report["prompt_token_estimate"] = token_estimate(args.iterations, args.warmup)
        report["end_to_end"] = asyncio.run(end_to_end(workdir, args.iterations, args.warmup))
    report["load_average"]["end"] = load_average()
    report["target_p50_ms"] = TARGET_P50_MS
    report["target_met"] = report["end_to_end"]["p50_difference_ms"] <= TARGET_P50_MS
    text = table(report)
    print(text)
    write_json("budget_overhead", report)
    (RESULTS / "budget_overhead.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
