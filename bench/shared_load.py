"""Load on two replicas sharing one Redis: throughput, hit rate, latency, errors, cross-replica visibility, and
(optionally) what clients see when Redis restarts under load.

Started here and stopped at the end: a redis-server (in memory), llama_cpp.server on SmolLM2 as the upstream (as
bench.latency runs it; --upstream names another OpenAI-compatible server instead) and two `cachecade serve`
replicas (as bench.cascade's serve() starts them) with CACHECADE_REDIS_URL and CACHECADE_CASCADE_ROUTES='{}' (no
local model loads; every miss goes upstream).

--clients concurrent clients run for --duration seconds, each taking the next prompt of one shared stream and
alternating between the replicas. The stream interleaves QQP duplicate pairs with ShareGPT first-turn prompts
(shuffled with a fixed seed, cut to --max-prompt-chars; they carry natural exact repeats): a pair's text_a comes
first, and its text_b joins the stream once text_a has been answered (so stored): every third request is such a
paraphrase when one is waiting, which should hit semantically. (A fixed distance in the stream would not do: with
a slow upstream and many clients, text_a can still be queued upstream when text_b is sent, or the run can end
before text_b comes.) Any non-200 answer or exception is an error. Beside the load, a prober sends fresh
questions (QQP non-duplicates unused by the stream) to one replica and, once answered (stored before the answer is
sent), polls the other every 5 ms with the exact repeat, then with a whitespace variant (a different exact key,
the same embedding: served only through the other replica's FAISS index, which follows the Redis event stream),
both with Cache-Control: no-store so a miss stores nothing.
With --restart-redis-at S, redis-server is killed (SIGKILL) S seconds in and started again, empty, on the same
port 3 seconds later; the replicas should fail open, so the target is zero failed client requests.

  HF_HUB_OFFLINE=1 .venv/bin/python -m bench.shared_load [--clients 200] [--duration 60] [--restart-redis-at 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.cascade import serve
from bench.common import RESULTS, load_average, machine, percentile, say, write_report
from bench.latency import API_KEY, GENERATION
from local_models.processes import start_llama_server, stop
from local_models.registry import smollm2_gguf
from tests.redis_server import start_redis

ROOT = Path(__file__).resolve().parent.parent
SHAREGPT = ("sharegpt_prompts/sg_90k_part1_html_cleaned_lang_first_sampled_sorted.json",
            "sharegpt_prompts/ShareGPT_V3_filtered_500.json")  # fmt: skip
QQP = "qqp_pairs/pairs.json"
POLL_S = 0.005
RESTART_GAP_S = 3.0


# --- data -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One request of the stream, and where it came from: qqp_a (with its paraphrase), qqp_b (the paraphrase of
    an answered qqp_a) or sharegpt."""

    text: str
    kind: str
    paraphrase: str | None = None


def sharegpt_prompts(data: Path, max_chars: int, seed: int) -> list[str]:
    texts = []
    for relative in SHAREGPT:
        for row in json.loads((data / relative).read_text()):
            turns = [t["value"] for t in row.get("conversations", []) if t.get("from") == "human"]
            if turns and turns[0].strip():
                texts.append(turns[0][:max_chars])
    random.Random(seed).shuffle(texts)  # file 1 is sorted by length
    return texts


def first_prompts(data: Path, max_chars: int, seed: int) -> tuple[list[Prompt], list[dict[str, Any]]]:
    """QQP text_a's (each with its paraphrase) and ShareGPT prompts, alternating; and the QQP rows."""
    rows = json.loads((data / QQP).read_text())
    pairs = [(r["text_a"], r["text_b"]) for r in rows if int(r["label"]) == 1 and r["text_a"].strip()
             and r["text_b"].strip() and r["text_a"] != r["text_b"]]  # fmt: skip
    random.Random(seed).shuffle(pairs)
    chats = [Prompt(text, "sharegpt") for text in sharegpt_prompts(data, max_chars, seed)]
    questions = [Prompt(a, "qqp_a", b) for a, b in pairs]
    mixed = [p for both in zip(questions, chats, strict=False) for p in both]
    return mixed + questions[len(chats) :] + chats[len(questions) :], rows


class Stream:
    """The prompts clients take in turn: first prompts, and every third request an answered text_a's paraphrase
    when one is waiting. Shared by every client (one event loop: no locking)."""

    def __init__(self, first: list[Prompt]) -> None:
        self.first = first
        self.ready: deque[Prompt] = deque()
        self.taken = 0
        self._next = 0

    def __next__(self) -> Prompt:
        self.taken += 1
        if self.taken % 3 == 0 and self.ready:
            return self.ready.popleft()
        prompt = self.first[self._next % len(self.first)]  # wraps around (and counts) once used up
        self._next += 1
        return prompt

    def answered(self, prompt: Prompt) -> None:
        """A first prompt was answered: its paraphrase may now come."""
        if prompt.paraphrase is not None:
            self.ready.append(Prompt(prompt.paraphrase, "qqp_b"))

    @property
    def wrapped(self) -> int:
        return self._next // len(self.first)


def fresh_questions(rows: list[dict[str, Any]], first: Sequence[Prompt], count: int, seed: int) -> list[str]:
    """Questions the stream never asks (QQP non-duplicates), for the visibility probes."""
    used = {p.text for p in first} | {p.paraphrase for p in first if p.paraphrase}
    pool = sorted({r["text_a"] for r in rows if int(r["label"]) == 0 and r["text_a"].strip()} - used)
    random.Random(seed).shuffle(pool)
    return pool[:count]


# --- load -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One client request's outcome; times are seconds since the load started."""

    start: float
    end: float
    replica: int
    kind: str
    status: str  # "200", another code, or the exception's class name
    cache: str

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


@dataclass
class Run:
    """Shared state of one load run."""

    bases: list[str]
    stream: Stream
    generation: dict[str, Any]
    deadline: float = 0.0
    t0: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    events: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def body(self, text: str) -> dict[str, Any]:
        return {**self.generation, "messages": [{"role": "user", "content": text}]}


async def request(client: httpx.AsyncClient, base: str, body: dict[str, Any], headers: dict[str, str] | None = None
                  ) -> tuple[str, str, dict[str, Any] | None]:  # fmt: skip
    """(status, x-cache, JSON body when 200); an exception becomes its class name as the status."""
    try:
        response = await client.post(f"{base}/v1/chat/completions", json=body, headers=headers)
    except (httpx.HTTPError, OSError) as exc:
        return type(exc).__name__, "NONE", None
    if response.status_code != 200:
        return str(response.status_code), response.headers.get("x-cache", "NONE"), None
    return "200", response.headers.get("x-cache", "NONE"), response.json()


async def client_loop(run: Run, client: httpx.AsyncClient, number: int) -> None:
    turn = number
    while run.now() < run.deadline:
        prompt = next(run.stream)
        replica, turn = turn % 2, turn + 1
        run.in_flight += 1
        start = run.now()
        status, cache, payload = await request(client, run.bases[replica], run.body(prompt.text))
        run.in_flight -= 1
        run.samples.append(Sample(start, run.now(), replica, prompt.kind, status, cache))
        if status != "200":
            run.errors[status] += 1
        elif cache == "MISS" and payload and payload["choices"][0].get("finish_reason") == "stop":
            run.stream.answered(prompt)  # stored: only complete answers are


# --- visibility probes ----------------------------------------------------------------------------------------


async def poll_until_hit(client: httpx.AsyncClient, base: str, body: dict[str, Any], since: float, timeout_s: float
                         ) -> tuple[float | None, int, str]:  # fmt: skip
    """Ask `base` every POLL_S until it serves `body` from the cache; (ms since `since` or None, polls, last
    x-cache). No-store: a miss forwarded upstream stores nothing, so only the other replica's entry can hit."""
    polls, cache = 0, "NONE"
    while time.monotonic() - since < timeout_s:
        polls += 1
        status, cache, _ = await request(client, base, body, {"Cache-Control": "no-store"})
        if status == "200" and cache.startswith("HIT"):
            return (time.monotonic() - since) * 1000, polls, cache
        await asyncio.sleep(POLL_S)
    return None, polls, cache


async def probe_one(run: Run, client: httpx.AsyncClient, i: int, text: str, timeout_s: float) -> dict[str, Any]:
    """Store a fresh question through one replica (alternating with i) and look for it on the other."""
    a, b = run.bases[i % 2], run.bases[1 - i % 2]
    status, cache, payload = await request(client, a, run.body(text))
    finish = payload["choices"][0].get("finish_reason") if payload else None
    row: dict[str, Any] = {"at_s": round(run.now(), 2), "store_status": status, "store_cache": cache}
    if status == "200" and cache == "MISS" and finish == "stop":
        stored = time.monotonic()
        row["exact_ms"], row["exact_polls"], row["exact_last"] = await poll_until_hit(
            client, b, run.body(text), stored, timeout_s
        )
        row["semantic_ms"], row["semantic_polls"], row["semantic_last"] = await poll_until_hit(
            client, b, run.body(text + " "), stored, timeout_s
        )
    return row


async def probe(run: Run, client: httpx.AsyncClient, questions: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """One probe started every duration / len(questions) seconds (each on its own: a miss upstream under load
    can take longer than the interval)."""
    interval = run.deadline / max(1, len(questions))
    tasks = []
    for i, text in enumerate(questions):
        await asyncio.sleep(max(0.0, i * interval - run.now()))
        tasks.append(asyncio.create_task(probe_one(run, client, i, text, timeout_s)))
    return list(await asyncio.gather(*tasks))


# --- Redis restart --------------------------------------------------------------------------------------------


@dataclass
class RedisProcess:
    """The redis-server, replaced when restarted."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])


async def restart_redis(run: Run, redis: RedisProcess, at_s: float) -> None:
    await asyncio.sleep(max(0.0, at_s - run.now()))
    redis.process.kill()
    await asyncio.to_thread(redis.process.wait)
    run.events["redis_killed_s"] = round(run.now(), 3)
    say(f"redis-server killed at {run.now():.1f}s")
    await asyncio.sleep(RESTART_GAP_S)
    redis.process, _ = await asyncio.to_thread(start_redis, redis.log, 10.0, redis.port)
    run.events["redis_up_s"] = round(run.now(), 3)
    say(f"redis-server answering again at {run.now():.1f}s (empty)")


async def load(args: argparse.Namespace, run: Run, redis: RedisProcess, questions: list[str]) -> dict[str, Any]:
    """Run the clients, the prober and the restart; returns what was left unfinished and the probes."""
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(headers=headers, timeout=timeout) as prober:  # fmt: skip
        run.t0, run.deadline = time.monotonic(), args.duration
        clients = [asyncio.create_task(client_loop(run, client, i)) for i in range(args.clients)]
        probes = asyncio.create_task(probe(run, prober, questions, args.visibility_timeout))
        restart = None
        if args.restart_redis_at is not None:
            restart = asyncio.create_task(restart_redis(run, redis, args.restart_redis_at))
        await asyncio.sleep(args.duration)
        say(f"{args.duration}s of load done; draining {run.in_flight} requests in flight (up to {args.drain}s)")
        _, pending = await asyncio.wait([*clients, probes], timeout=args.drain)
        unfinished = run.in_flight
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if restart is not None:
            await restart
        probe_rows = probes.result() if probes.done() and not probes.cancelled() else []
    return {"unfinished": unfinished, "probes": probe_rows, "drain_s": round(run.now() - args.duration, 2)}


# --- report ---------------------------------------------------------------------------------------------------


def latency(samples: Sequence[Sample]) -> dict[str, Any]:
    ms = [s.ms for s in samples]
    if not ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2)}


def hit_rate(samples: Sequence[Sample]) -> float | None:
    ok = [s for s in samples if s.status == "200"]
    return round(sum(s.cache.startswith("HIT") for s in ok) / len(ok), 4) if ok else None


def visibility(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"probes": len(rows), "stored": sum("exact_ms" in r for r in rows)}
    for tier in ("exact", "semantic"):
        seen = [r[f"{tier}_ms"] for r in rows if r.get(f"{tier}_ms") is not None]
        out[tier] = {"visible": len(seen), "not_visible": sum(f"{tier}_ms" in r and r[f"{tier}_ms"] is None
                                                              for r in rows),
                     "p50_ms": round(percentile(seen, 50), 2) if seen else None,
                     "p99_ms": round(percentile(seen, 99), 2) if seen else None,
                     "first_poll_hits": sum(r.get(f"{tier}_polls") == 1 and r.get(f"{tier}_ms") is not None
                                            for r in rows)}  # fmt: skip
    return out


def summarise(run: Run, args: argparse.Namespace, drained: dict[str, Any]) -> dict[str, Any]:
    samples = run.samples
    ok = [s for s in samples if s.status == "200"]
    within = [s for s in samples if s.end <= args.duration]
    figures: dict[str, Any] = {
        "requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok), "errors_by_kind": dict(run.errors),
        "unfinished_at_drain_limit": drained["unfinished"], "drain_s": drained["drain_s"],
        "throughput_rps": round(len(within) / args.duration, 1),
        "hit_rate": hit_rate(samples), "x_cache": dict(Counter(s.cache for s in ok)),
        "latency": latency(ok), "latency_hits": latency([s for s in ok if s.cache.startswith("HIT")]),
        "latency_not_hits": latency([s for s in ok if not s.cache.startswith("HIT")]),
        "latency_by_x_cache": {c: latency([s for s in ok if s.cache == c]) for c in sorted({s.cache for s in ok})},
        "by_kind": {k: {"n": sum(s.kind == k for s in samples), "hit_rate": hit_rate([s for s in samples
                    if s.kind == k]), "x_cache": dict(Counter(s.cache for s in ok if s.kind == k))}
                    for k in ("qqp_a", "qqp_b", "sharegpt")},
        "by_replica": {str(r): {"n": sum(s.replica == r for s in samples), **latency([s for s in ok if s.replica == r])}
                       for r in (0, 1)},
        "stream_prompts_taken": run.stream.taken, "first_prompts_wrapped": run.stream.wrapped,
        "paraphrases_waiting_at_end": len(run.stream.ready),
        "visibility": visibility(drained["probes"]),
    }  # fmt: skip
    if "redis_killed_s" in run.events:
        killed, up = run.events["redis_killed_s"], run.events.get("redis_up_s", args.duration)
        during = [s for s in samples if s.end >= killed and s.start <= up + 10]
        figures["restart"] = {**run.events, "requests_in_window": len(during),
                              "failed_in_window": sum(s.status != "200" for s in during),
                              "hit_rate_in_window": hit_rate(during), "latency_in_window": latency(
                                  [s for s in during if s.status == "200"]),
                              # fail-open answers once Redis is back: how long the store's breaker backs off
                              "bypass_started_after_up": sum(s.cache == "BYPASS" and s.start >= up for s in samples),
                              "last_bypass_start_s": max((round(s.start, 3) for s in samples if s.cache == "BYPASS"),
                                                         default=None)}  # fmt: skip
    return figures


def render(report: dict[str, Any]) -> str:
    m, f = report["machine"], report["figures"]
    lat, vis = f["latency"], f["visibility"]
    lines = [f"cachecade shared load ({m['platform']}, {m['cpus']} CPUs, Python {m['python']}; load average "
             f"1/5/15 min start {m['load_average_start']} end {m['load_average_end']})",
             f"setup: {report['setup']}", f"data: {report['data']}", "",
             f"{'clients':>7} {'secs':>5} {'requests':>8} {'req/s':>7} {'hit rate':>8} {'p50 ms':>8} {'p99 ms':>9} "
             f"{'errors':>6} {'unfinished':>10}",
             f"{report['settings']['clients']:>7} {report['settings']['duration_s']:>5} {f['requests']:>8} "
             f"{f['throughput_rps']:>7.1f} {_pct(f['hit_rate']):>8} {_ms(lat['p50_ms']):>8} {_ms(lat['p99_ms']):>9} "
             f"{f['errors']:>6} {f['unfinished_at_drain_limit']:>10}", ""]  # fmt: skip
    lines.append(f"x-cache: {f['x_cache']}; errors: {f['errors_by_kind'] or 'none'}")
    for name, row in [("hits", f["latency_hits"]), *f["latency_by_x_cache"].items()]:
        lines.append(f"  {name:<12} n {row['n']:>6}  p50 {_ms(row['p50_ms']):>8} ms  p99 {_ms(row['p99_ms']):>9} ms")
    for kind, k in f["by_kind"].items():
        lines.append(f"  {kind:<12} n {k['n']:>6}  hit rate {_pct(k['hit_rate']):>6}  x-cache {k['x_cache']}")
    lines += ["", f"cross-replica visibility ({vis['probes']} fresh questions, {vis['stored']} stored through one "
              f"replica; the other polled every {POLL_S * 1000:.0f} ms, no-store)"]  # fmt: skip
    for tier, note in (("exact", "exact repeat: Redis x: key"), ("semantic", "whitespace variant: follower index")):
        v = vis[tier]
        lines.append(
            f"  {tier:<8} visible {v['visible']:>3} (first poll {v['first_poll_hits']:>3}, never "
            f"{v['not_visible']:>2})  p50 {_ms(v['p50_ms']):>8} ms  p99 {_ms(v['p99_ms']):>8} ms  ({note})"
        )
    if "restart" in f:
        r = f["restart"]
        lines += ["", f"redis restart: killed at {r['redis_killed_s']} s, answering again at {r.get('redis_up_s')} s "
                  f"(empty); window to +10 s: {r['requests_in_window']} requests, {r['failed_in_window']} failed "
                  f"(target 0: {'MET' if r['failed_in_window'] == 0 else 'NOT MET'}), hit rate "
                  f"{_pct(r['hit_rate_in_window'])}, p50 {_ms(r['latency_in_window']['p50_ms'])} ms, p99 "
                  f"{_ms(r['latency_in_window']['p99_ms'])} ms",
                  f"  fail-open (BYPASS) requests started after Redis was back: {r['bypass_started_after_up']}, the "
                  f"last started at {r['last_bypass_start_s']} s"]  # fmt: skip
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# --- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.shared_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="default ../shared/data")
    p.add_argument("--clients", type=int, default=200, help="concurrent clients (200)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    p.add_argument("--restart-redis-at", type=float, help="kill redis-server at S s, restart it 3 s later")
    p.add_argument("--visibility-samples", type=int, default=40, help="fresh questions probed (40)")
    p.add_argument("--visibility-timeout", type=float, default=5.0, help="seconds a probe polls (5)")
    p.add_argument("--max-prompt-chars", type=int, default=1000,
                   help="ShareGPT prompts are cut to this (1000; the upstream's context is 2048 tokens)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=300.0, help="client timeout per request (300 s)")
    p.add_argument("--drain", type=float, default=120.0, help="seconds to wait for requests in flight at the end")
    p.add_argument("--upstream-threads", type=int, default=1, help="llama.cpp threads of the upstream (1)")
    p.add_argument("--upstream", help="an OpenAI-compatible /v1 URL to use instead of starting llama_cpp.server")
    p.add_argument("--model", default=GENERATION["model"], help="model to ask for (smollm2, the local upstream's)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="extra replica setting, e.g. cache_threshold=0.9 (repeatable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "shared_load.json", help="JSON report (.txt beside it)")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0:
        p.error("--clients and --duration must be positive")
    if args.restart_redis_at is not None and not 0 < args.restart_redis_at < args.duration:
        p.error("--restart-redis-at must fall inside --duration")
    args.set = dict(s.partition("=")[::2] for s in args.set)
    return args


def start(workdir: Path, args: argparse.Namespace) -> tuple[list[subprocess.Popen[bytes]], RedisProcess, list[str]]:
    """redis-server, the upstream and two replicas; returns the processes to stop, Redis and the replicas' URLs."""
    started: list[subprocess.Popen[bytes]] = []
    process, url = start_redis(workdir / "redis.log")
    redis = RedisProcess(process, url, workdir / "redis.log")
    try:
        upstream_v1 = args.upstream
        if upstream_v1 is None:
            llama, upstream_v1 = start_llama_server(smollm2_gguf(), "smollm2", workdir / "llama-server.log",
                                                    threads=args.upstream_threads)  # fmt: skip
            started.append(llama)
        settings = {"upstream_base_url": upstream_v1, "redis_url": url, "cascade_routes": "{}",
                    "cache_exact_enabled": "true", "cache_semantic_enabled": "true", **args.set}  # fmt: skip
        bases = []
        for name in ("replica-a", "replica-b"):
            replica, base = serve(workdir, name, settings)
            started.append(replica)
            bases.append(base)
    except BaseException:
        for p in [*started, redis.process]:
            stop(p)
        raise
    return started, redis, bases


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    first, rows = first_prompts(args.data, args.max_prompt_chars, args.seed)
    questions = fresh_questions(rows, first, args.visibility_samples, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-shared-load-") as tmp:
        workdir = Path(tmp)
        say(f"starting redis-server, {args.upstream or 'llama_cpp.server (SmolLM2)'} and two replicas")
        started, redis, bases = start(workdir, args)
        try:
            say(f"replicas {bases} up; {args.clients} clients for {args.duration:.0f}s")
            load_start = load_average()
            run = Run(bases, Stream(first), GENERATION | {"model": args.model})
            drained = asyncio.run(load(args, run, redis, questions))
            load_end = load_average()
        finally:
            for p in [*reversed(started), redis.process]:
                stop(p)
    report = {
        "benchmark": "shared_load",
        "machine": machine() | {"load_average_start": load_start, "load_average_end": load_end},
        "setup": "redis-server 1, cachecade serve x2 (CACHECADE_REDIS_URL, CACHECADE_CASCADE_ROUTES={}), upstream "
        + (args.upstream or f"llama_cpp.server SmolLM2-135M Q4_1 n_ctx 2048, {args.upstream_threads} thread(s)")
        + "; all on this machine",
        "data": f"{args.data / QQP} duplicate pairs (text_a; text_b once text_a was answered, every third request) "
        f"interleaved with {', '.join(str(args.data / s) for s in SHAREGPT)} (shuffled, seed {args.seed}, cut to "
        f"{args.max_prompt_chars} chars); {len(first)} first prompts",
        "settings": {"clients": args.clients, "duration_s": args.duration, "restart_redis_at_s": args.restart_redis_at,
                     "generation": run.generation, "replica_settings": args.set, "poll_ms": POLL_S * 1000},
        "figures": summarise(run, args, drained),
    }  # fmt: skip
    write_report("shared_load", report, render(report), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
