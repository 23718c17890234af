"""Learned thresholds on a replayed stream, against an oracle upstream: does the served error rate of semantic hits
stay under the target delta, and what does holding it cost in hits?

- **Stream** (fixed seed): held-out QQP pairs (the validation split of train-verifier's seed, never trained on),
  each pair's first question asked, its second asked later (a duplicate should hit, a non-duplicate must not),
  plus 10 % exact repeats. Gold answers: the QQP duplicate pairs joined into clusters, one answer per cluster, so
  a served answer is right exactly when it is the query's cluster's. `--stream gptcache`: the same built from
  GPTCache's 999 (origin, similar) paraphrases instead: cleaner gold (QQP leaves many duplicates unlabelled, which
  the oracle then counts as wrong hits), never seen by the verifier's training.
- **Upstream**: bench/oracle_upstream.py, a real HTTP server answering each question with its gold answer; so
  shadow checks compare gold answers, and the error of every semantic hit is known exactly.
- **Runs**: the shipped default (verifier on, threshold fixed) against the same with `max_error = delta` and shadow
  checks on a share of hits. Per window: semantic hits, wrong ones, the served error rate, the threshold in force
  and the rule's upper bound. The cascade half of the learning issue is bench/learning_cascade.py.

  python -m bench.learning --data ../shared/data [--requests 3000] [--delta 0.02] [--shadow 0.2] [--stream gptcache]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, plot_windows, say, write_report
from bench.latency import start_proxy
from cache.calibration import wilson
from cache.verifier_data import Pair, read_pairs, split_of
from local_models.processes import free_port, stop, wait_until_up

ADMIN = "bench-admin-token-0123456789"
KEY = {"authorization": "Bearer sk-bench-learning"}


def clusters(pairs: list[Any]) -> dict[str, str]:
    """Gold answers: questions joined by duplicate pairs share one."""
    parent: dict[str, str] = {}

    def root(q: str) -> str:
        parent.setdefault(q, q)
        while parent[q] != q:
            parent[q] = parent[parent[q]]
            q = parent[q]
        return q

    for p in pairs:
        a, b = root(p.a), root(p.b)
        if p.label == 1 and a != b:
            parent[a] = b
    names: dict[str, str] = {}
    return {q: names.setdefault(root(q), f"answer {len(names)}") for q in list(parent)}


def stream(pairs: list[Any], requests: int, seed: int) -> list[str]:
    """First questions, their second questions later, and exact repeats."""
    rng = random.Random(seed)
    chosen = rng.sample(pairs, min(len(pairs), requests // 2))
    out: list[str] = []
    pending: list[tuple[int, str]] = []
    for p in chosen:
        out.append(p.a)
        pending.append((len(out) + rng.randint(1, 200), p.b))
        pending.sort()
        while pending and pending[0][0] <= len(out):
            out.append(pending.pop(0)[1])
        if rng.random() < 0.1:
            out.append(rng.choice(out))
    out += [q for _, q in pending]
    return out[:requests]


async def replay(proxy: str, questions: list[str], gold: dict[str, str], window: int) -> list[dict[str, Any]]:
    admin = {"authorization": f"Bearer {ADMIN}"}
    rows: list[dict[str, Any]] = []
    current: dict[str, Any] = {"requests": 0, "semantic": 0, "wrong": 0, "exact": 0}
    async with httpx.AsyncClient(base_url=proxy, timeout=60) as client:
        for i, q in enumerate(questions, 1):
            r = await client.post("/v1/chat/completions", headers=KEY,
                                  json={"model": "oracle", "messages": [{"role": "user", "content": q}]})  # fmt: skip
            r.raise_for_status()
            current["requests"] += 1
            if r.headers["x-cache"] == "HIT-SEMANTIC":
                current["semantic"] += 1
                served = r.json()["choices"][0]["message"]["content"]
                if served != gold[q]:
                    current["wrong"] += 1
                    current.setdefault("wrong_hits", []).append(
                        {"query": q, "served_for": served, "score": float(r.headers.get("x-cache-verifier-score", 0))}
                    )
            elif r.headers["x-cache"] == "HIT-EXACT":
                current["exact"] += 1
            if i % window == 0 or i == len(questions):
                config = (await client.get("/admin/config", headers=admin)).json()
                learning = (await client.get("/admin/learning", headers=admin)).json()
                scope = learning["scopes"].get("semantic/verifier/default") or {}
                decision = scope.get("decision") or {}
                current |= {"upto": i, "threshold": config["verifier_namespace_thresholds"].get(
                    "default", config["verifier_threshold"]), "labels": scope.get("labels", 0),
                    "bound": decision.get("bound"), "shadow": learning["stats"]["shadow"],
                    "upstream_answers": learning["stats"]["upstream_answers"]}  # fmt: skip
                rows.append(current)
                current = {"requests": 0, "semantic": 0, "wrong": 0, "exact": 0}
    return rows


@contextlib.contextmanager
def serve_oracle(workdir: Path, gold: dict[str, str]) -> Iterator[str]:
    """The oracle upstream answering `gold`, up; yields its /v1 URL and stops it on the way out."""
    answers = workdir / "answers.json"
    answers.write_text(json.dumps(gold))
    port = free_port()
    oracle_log = workdir / "oracle.log"
    env = {**os.environ, "ORACLE_ANSWERS": str(answers)}
    with oracle_log.open("w") as out:
        oracle = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.oracle_upstream:app", "--port",
                                   str(port), "--log-level", "warning"], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", oracle, oracle_log, 60)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(oracle)


@contextlib.contextmanager
def oracle_and_proxy(workdir: Path, gold: dict[str, str], extra: dict[str, str]) -> Iterator[str]:
    """The oracle upstream (answering `gold`) and a `cachecade serve` in front of it, both up; yields the proxy's
    base URL and stops both on the way out."""
    with serve_oracle(workdir, gold) as upstream:
        proxy, url, log = start_proxy(workdir, upstream, 0.95, {"CACHECADE_ADMIN_TOKEN": ADMIN, **extra})
        try:
            wait_until_up(f"{url}/readyz", proxy, log, 300)
            yield url
        finally:
            stop(proxy)


def run(mode: str, questions: list[str], gold: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    extra = {"CACHECADE_CASCADE_ROUTES": "{}", "CACHECADE_LEARN_SEED": str(args.seed)}
    if mode == "learning":
        extra |= {"CACHECADE_CACHE_MAX_ERROR": repr(args.delta), "CACHECADE_CACHE_SHADOW_SHARE": repr(args.shadow),
                  "CACHECADE_CACHE_SHADOW_MAX_SHARE": repr(args.shadow)}  # fmt: skip
    with tempfile.TemporaryDirectory() as work, oracle_and_proxy(Path(work), gold, extra) as url:
        started = time.monotonic()
        rows = asyncio.run(replay(url, questions, gold, args.window))
        seconds = time.monotonic() - started
    semantic, wrong = sum(r["semantic"] for r in rows), sum(r["wrong"] for r in rows)
    asked_by: dict[str, str] = {}
    for question, answer in gold.items():
        asked_by.setdefault(answer, question)
    wrong_hits = [w | {"served_for": asked_by.get(w["served_for"], w["served_for"])}
                  for r in rows for w in r.pop("wrong_hits", [])]  # fmt: skip
    return {"mode": mode, "windows": rows, "seconds": round(seconds, 1), "semantic_hits": semantic, "wrong": wrong,
            "error_rate": wrong / max(1, semantic), "error_ci": wilson(wrong, semantic),
            "hit_rate": semantic / len(questions), "wrong_at_score_1": sum(w["score"] >= 0.9999 for w in wrong_hits),
            "wrong_hits": wrong_hits}  # fmt: skip


def table(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']}",
             f"stream: {report['requests']} requests from {report['pairs']} {report.get('stream', 'qqp')} pairs (seed "
             f"{report['seed']}); delta {report['delta']:.1%}, shadow share {report['shadow']:.0%}"]  # fmt: skip
    for run_ in report["runs"]:
        lines.append(f"\n{run_['mode']}: semantic hits {run_['semantic_hits']} ({run_['hit_rate']:.1%} of requests), "
                     f"wrong {run_['wrong']} = {run_['error_rate']:.2%} [{run_['error_ci'][0]:.2%}-"
                     f"{run_['error_ci'][1]:.2%}], {run_['seconds']} s")  # fmt: skip
        lines.append(
            f"wrong hits scored 1.0 (the same question in another form, served without the model): "
            f"{run_['wrong_at_score_1']}; some wrong hits (query <- a question with the answer served):"
        )
        lines += [
            f"  {w['score']:.3f}  {w['query'][:70]!r} <- {w['served_for'][:70]!r}" for w in run_["wrong_hits"][:6]
        ]
        lines.append(f"{'upto':>6} {'semantic':>8} {'wrong':>5} {'error':>7} {'threshold':>9} {'labels':>6} "
                     f"{'bound':>7} {'shadow':>6} {'upstream':>8}")  # fmt: skip
        for w in run_["windows"]:
            bound = f"{w['bound']:.3f}" if w["bound"] is not None else "-"
            error = w["wrong"] / max(1, w["semantic"])
            lines.append(f"{w['upto']:>6} {w['semantic']:>8} {w['wrong']:>5} {error:>7.1%} {w['threshold']:>9.4f} "
                         f"{w['labels']:>6} {bound:>7} {w['shadow']['checks']:>6} "
                         f"{w['upstream_answers']:>8}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--delta", type=float, default=0.02)
    parser.add_argument("--shadow", type=float, default=0.2, help="share of semantic hits shadow-checked")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", choices=("qqp", "gptcache"), default="qqp",
                        help="qqp: held-out QQP pairs (noisy labels); gptcache: GPTCache's 999 paraphrase pairs "
                        "(every pair the same, every two origins different; never trained on)")  # fmt: skip
    args = parser.parse_args()
    if args.stream == "gptcache":
        rows = json.loads((Path(args.data) / "gptcache_mock" / "mock_data.json").read_text())
        pairs = [Pair(str(r["origin"]), str(r["similar"]), 1) for r in rows]
    else:
        pairs = [p for p in read_pairs(Path(args.data) / "qqp_pairs" / "pairs.json") if split_of(p, 0) == "validation"]
    gold = clusters(pairs)
    questions = stream(pairs, args.requests, args.seed)
    say(f"{len(questions)} requests from {len(pairs)} held-out pairs")
    report: dict[str, Any] = {"machine": machine(), "requests": len(questions), "pairs": len(pairs), "seed": args.seed,
                              "stream": args.stream,
                              "delta": args.delta, "shadow": args.shadow, "runs": []}  # fmt: skip
    for mode in ("fixed", "learning"):
        say(f"run: {mode}")
        report["runs"].append(run(mode, questions, gold, args))
    path = write_report("learning" if args.stream == "qqp" else f"learning_{args.stream}", report, table(report))
    plot_windows(
        report,
        path.with_suffix(".png"),
        ("error rate of semantic hits (window)", lambda w: w["wrong"] / max(1, w["semantic"])),
        ("verifier threshold", lambda w: w["threshold"]),
        line=report["delta"],
    )


if __name__ == "__main__":
    main()
