"""Soak: mixed traffic against one `cachecade serve` (the embedded default with the packaged models, an oracle
upstream that streams) for `--minutes`, sampled every `--sample-s`:

- traffic, from `--concurrency` clients: exact hits (a pool of questions asked again and again), misses (new
  questions to the upstream's model, and to the cascade's route: the packaged models, then the upstream), streams
  (hits replayed and misses streamed), clients that leave a stream after its first event, and admin changes (a
  threshold set back and forth, stats and models read);
- per sample: resident memory of the proxy and of its model workers (from /proc), the proxy's open file descriptors,
  the event loop's lag (the proxy's own `cachecade_event_loop_lag_seconds` histogram, between two scrapes), and
  each kind of request's latency and errors.

The report compares the first window after the warm-up with the last one.

  python -m bench.soak --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, percentile, say, write_report
from bench.hardening import descendants
from bench.latency import start_proxy
from bench.learning import ADMIN, serve_oracle
from local_models.cascade import DEFAULT_ROUTE
from local_models.processes import stop, wait_until_up

WORDS = ["river", "mountain", "engine", "garden", "silver", "planet", "winter", "market", "letter", "castle", "bridge",
         "forest", "window", "doctor", "pencil", "island", "camera", "rocket", "violin", "desert", "harbor", "candle",
         "ladder", "museum", "tunnel", "orchard", "glacier"]  # fmt: skip
KINDS = ("hit", "miss", "local", "stream", "leave", "admin")
LAG_METRIC = "cachecade_event_loop_lag_seconds"


def question(rng: random.Random, n: int) -> str:
    return f"Question {n}: what links the {rng.choice(WORDS)}, the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?"


def chat(text: str, stream: bool = False, model: str = "oracle") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, "max_tokens": 48}


@dataclass
class Tally:
    """What the clients saw since the last sample: per kind, latencies (ms) and failures."""

    ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def take(self) -> Tally:
        taken = Tally(self.ms, self.failed)
        self.ms, self.failed = defaultdict(list), defaultdict(list)
        return taken


async def one(client: httpx.AsyncClient, kind: str, rng: random.Random, pool: list[str], fresh: list[int]) -> None:
    """One request of `kind`; raises on a failure (a status other than the expected, or a broken stream)."""
    if kind == "hit":
        r = await client.post("/v1/chat/completions", json=chat(rng.choice(pool)))
        r.raise_for_status()
    elif kind in ("miss", "local"):  # local: the cascade's route (the packaged models, then the upstream)
        fresh[0] += 1
        model = DEFAULT_ROUTE if kind == "local" else "oracle"
        r = await client.post("/v1/chat/completions", json=chat(question(rng, fresh[0]), model=model))
        r.raise_for_status()
    elif kind in ("stream", "leave"):
        fresh[0] += 1
        text = rng.choice(pool) if kind == "stream" and rng.random() < 0.5 else question(rng, fresh[0])
        async with client.stream("POST", "/v1/chat/completions", json=chat(text, stream=True)) as r:
            r.raise_for_status()
            done = False
            async for line in r.aiter_lines():
                if kind == "leave" and line.startswith("data: "):
                    return  # the client goes away after the first event: the connection is closed
                done = done or line == "data: [DONE]"
            if not done:
                raise RuntimeError("stream ended without [DONE]")
    else:
        admin = {"authorization": f"Bearer {ADMIN}"}
        choice = rng.random()
        if choice < 0.4:
            r = await client.put("/admin/config", headers=admin, json={"threshold": rng.choice([0.95, 0.96])})
        elif choice < 0.8:
            r = await client.get("/admin/stats", headers=admin)
        else:
            r = await client.get("/v1/models")
        r.raise_for_status()


async def client_loop(url: str, seed: int, pool: list[str], fresh: list[int], tally: Tally, end: float,
                      mix: list[float]) -> None:  # fmt: skip
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while time.monotonic() < end:
            kind = rng.choices(KINDS, weights=mix)[0]
            started = time.perf_counter()
            try:
                await one(client, kind, rng, pool, fresh)
            except (httpx.HTTPError, RuntimeError) as exc:
                status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else type(exc).__name__
                tally.failed[kind].append(str(status))
                continue
            tally.ms[kind].append((time.perf_counter() - started) * 1000)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def lag_buckets(text: str) -> dict[float, float]:
    """The loop-lag histogram's cumulative bucket counts from a /metrics scrape: {upper bound: count}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(f"{LAG_METRIC}_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """p50 / p99 / max (as histogram bucket bounds, ms) of the lag observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def bound_at(q: float) -> float:
        for b, c in zip(bounds, counts, strict=True):
            if c >= q * total:
                return b * 1000
        return float("inf")

    top = next((b for b, c in zip(reversed(bounds), reversed(counts), strict=True) if c < total), None)
    above = bounds[bounds.index(top) + 1] if top is not None else bounds[0] if bounds else 0.0
    return {"samples": total, "p50_ms": bound_at(0.5), "p99_ms": bound_at(0.99), "max_ms_at_most": above * 1000}


async def sampler(url: str, pid: int, tally: Tally, end: float, every_s: float, samples: list[dict[str, Any]]) -> None:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        previous = lag_buckets((await client.get("/metrics")).text)
        while time.monotonic() < end:
            await asyncio.sleep(min(every_s, max(0.0, end - time.monotonic())))
            text = (await client.get("/metrics")).text
            scrape = lag_buckets(text)
            vectors = re.search(r"^cachecade_cache_index_vectors ([\d.e+]+)$", text, re.M)
            seen = tally.take()
            workers = descendants(pid)
            samples.append({
                "t_s": round(time.monotonic() - started, 1),
                "rss_proxy_mb": round(rss_mb(pid), 1),
                "rss_workers_mb": round(sum(rss_mb(w) for w in workers if Path(f"/proc/{w}").exists()), 1),
                "open_fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
                "cached_entries": int(float(vectors.group(1))) if vectors else None,
                "loop_lag": lag_between(previous, scrape),
                "requests": {k: len(v) for k, v in seen.ms.items()},
                "p50_ms": {k: round(percentile(v, 50), 1) for k, v in seen.ms.items() if v},
                "p99_ms": {k: round(percentile(v, 99), 1) for k, v in seen.ms.items() if v},
                "failed": {k: v for k, v in seen.failed.items()},
            })  # fmt: skip
            previous = scrape
            say(f"soak t={samples[-1]['t_s']:.0f}s rss={samples[-1]['rss_proxy_mb']:.0f}+"
                f"{samples[-1]['rss_workers_mb']:.0f} MB fds={samples[-1]['open_fds']} "
                f"lag p99<={samples[-1]['loop_lag']['p99_ms']:g} ms requests={samples[-1]['requests']} "
                f"failed={ {k: len(v) for k, v in seen.failed.items()} }")  # fmt: skip


def window(samples: list[dict[str, Any]], first: bool, span: int) -> dict[str, Any]:
    """Sums over `span` samples at the start (after the warm-up sample) or at the end."""
    part = samples[1 : 1 + span] if first else samples[-span:]
    requests: dict[str, int] = defaultdict(int)
    failed: dict[str, int] = defaultdict(int)
    for s in part:
        for k, n in s["requests"].items():
            requests[k] += n
        for k, v in s["failed"].items():
            failed[k] += len(v)
    at = part[0] if first else part[-1]  # memory and fds: at the window's start, or at the very end
    return {
        "from_s": part[0]["t_s"], "to_s": part[-1]["t_s"],
        "rss_proxy_mb": at["rss_proxy_mb"], "rss_workers_mb": at["rss_workers_mb"], "open_fds": at["open_fds"],
        "cached_entries": at.get("cached_entries"),
        "loop_lag_p99_ms": max(s["loop_lag"]["p99_ms"] for s in part),
        "loop_lag_max_ms_at_most": max(s["loop_lag"]["max_ms_at_most"] for s in part),
        "requests": dict(requests), "failed": dict(failed),
        "hit_p50_ms": percentile([s["p50_ms"].get("hit", 0.0) for s in part], 50),
    }  # fmt: skip


def table(report: dict[str, Any]) -> str:
    start, end = report["start"], report["end"]
    rows = [
        ("proxy RSS (MB)", start["rss_proxy_mb"], end["rss_proxy_mb"]),
        ("model workers' RSS (MB)", start["rss_workers_mb"], end["rss_workers_mb"]),
        ("proxy open fds", start["open_fds"], end["open_fds"]),
        ("entries in the cache (index vectors)", start["cached_entries"], end["cached_entries"]),
        ("event-loop lag p99 (ms, bucket bound)", start["loop_lag_p99_ms"], end["loop_lag_p99_ms"]),
        ("event-loop lag max (ms, at most)", start["loop_lag_max_ms_at_most"], end["loop_lag_max_ms_at_most"]),
        ("exact-hit p50 (ms)", round(start["hit_p50_ms"], 1), round(end["hit_p50_ms"], 1)),
        ("requests in the window", sum(start["requests"].values()), sum(end["requests"].values())),
        ("failed in the window", sum(start["failed"].values()), sum(end["failed"].values())),
    ]
    lines = [f"soak: {report['minutes']} min, {report['concurrency']} clients, {report['requests']} requests "
             f"({report['by_kind']}), failed {report['failed']}",
             f"| | start ({start['from_s']:.0f}-{start['to_s']:.0f} s) "
             f"| end ({end['from_s']:.0f}-{end['to_s']:.0f} s) |",
             "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--window", type=int, default=10, help="samples in the start and end windows")
    parser.add_argument("--mix", default="58,10,4,12,10,6", help="weights of " + ",".join(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    mix = [float(x) for x in args.mix.split(",")]
    rng = random.Random(args.seed)
    pool = [question(rng, -i) for i in range(1, 201)]
    gold = {q: f"The link is the {rng.choice(WORDS)}." for q in pool}
    samples: list[dict[str, Any]] = []
    tally = Tally()
    with tempfile.TemporaryDirectory() as work, serve_oracle(Path(work), gold) as upstream:
        proxy, url, log = start_proxy(Path(work), upstream, 0.95, {"CACHECADE_ADMIN_TOKEN": ADMIN})
        try:
            wait_until_up(f"{url}/readyz", proxy, log, 300)
            end = time.monotonic() + args.minutes * 60

            async def run() -> None:
                fresh = [0]
                clients = [client_loop(url, args.seed * 1000 + i, pool, fresh, tally, end, mix)
                           for i in range(args.concurrency)]  # fmt: skip
                await asyncio.gather(sampler(url, proxy.pid, tally, end, args.sample_s, samples), *clients)

            asyncio.run(run())
        finally:
            with contextlib.suppress(Exception):
                stop(proxy)
    span = max(1, min(args.window, (len(samples) - 1) // 2))
    by_kind: dict[str, int] = defaultdict(int)
    for s in samples:
        for k, n in s["requests"].items():
            by_kind[k] += n
    report = {
        "machine": machine(), "minutes": args.minutes, "concurrency": args.concurrency,
        "mix": dict(zip(KINDS, mix, strict=True)),
        "requests": sum(by_kind.values()), "by_kind": dict(by_kind),
        "failed": sum(len(v) for s in samples for v in s["failed"].values()),
        "start": window(samples, True, span), "end": window(samples, False, span), "samples": samples,
    }  # fmt: skip
    text = table(report)
    print(text)
    write_report("soak", report, text, args.out)


if __name__ == "__main__":
    main()
