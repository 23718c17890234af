"""The cascade half of learning from traffic: does the router take the local tiers' latency off questions they
cannot answer, while keeping the local answers the gate accepts, and do learnt gates hold the error target?

- **Questions** (fixed seed): N each from NQ-open and SVAMP (and with --easy, capital-city questions the packaged
  SmolLM2 answers right and confidently), shuffled, each asked once as
  `local_models.calibration.messages` asks it. `cache-control: no-store`: the cache embeds every question (the
  router reads that embedding) but stores nothing, so every request reaches the cascade.
- **Upstream**: bench/oracle_upstream.py answering each question with its gold answer (the first NQ alias, the
  SVAMP number), so escalation comparisons and shadow checks are exact labels, and every local answer is graded
  with `calibration.is_correct`; or (`--upstream real`) a real one: Gemma 3 270M behind a second `cachecade
  serve`, whose answers are graded too and whose disagreements make noisy labels.
- **Runs**, each a fresh `cachecade serve` (packaged SmolLM2 -> Gemma 3 -> upstream, the shipped gate thresholds):
  `upstream-only` (no route), `cascade` (router off, gates fixed), `router` (router on, gates fixed) and
  `router+learning` (router on, `max_error = delta`, shadow checks on a share of accepted local answers).
- **Reported**: per window, latency and what answered; the latency (p50) on the questions the local tiers cannot
  answer (those no local tier answered in the `cascade` run) after the warm-up, against `upstream-only` on the
  same questions; the share of the `cascade` run's local answers each run kept; the error of accepted local
  answers (with a Wilson interval) and the learnt gates with their upper bounds; shadow calls as a share of
  upstream calls.

  python -m bench.learning_cascade --data ../shared/data [--n 150] [--window 50] [--warmup 100] [--delta 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench.cascade import big_upstream_settings, serve
from bench.common import machine, percentile, plot_windows, say, write_report
from bench.latency import start_proxy
from bench.learning import ADMIN, oracle_and_proxy
from cache.calibration import wilson
from local_models.calibration import MAX_TOKENS, QAItem, is_correct, load_qa, messages
from local_models.processes import stop, wait_until_up

DATASETS = {"nq_open": "nq_open/NQ-open.dev.jsonl", "svamp": "svamp/SVAMP.json"}
# --easy: questions the packaged SmolLM2 answers right and confidently (about 0.8 to 0.85), so the router's price
# (local answers the gate would have accepted but a skip gave away) is measured where there is something to keep.
CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Czech Republic": "Prague",
    "Romania": "Bucharest",
    "Ukraine": "Kyiv",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Vietnam": "Hanoi",
    "South Korea": "Seoul",
    "England": "London",
    "Scotland": "Edinburgh",
    "Iceland": "Reykjavik",
    "Turkey": "Ankara",
}
ROUTE = '{"cachecade/auto": ["smollm2", "gemma3", "upstream"]}'
RUNS = ("upstream-only", "cascade", "router", "router+learning")
HEADERS = {"authorization": "Bearer sk-bench-cascade", "cache-control": "no-store"}


def gold_text(item: QAItem) -> str:
    if item.number is not None:
        return f"{item.number:g}"
    return item.answers[0]


def settings_for(mode: str, args: argparse.Namespace) -> dict[str, str]:
    extra = {"CACHECADE_CASCADE_ROUTES": ROUTE, "CACHECADE_LEARN_SEED": str(args.seed),
             "CACHECADE_CASCADE_ROUTER": "false" if mode in ("upstream-only", "cascade") else "true"}  # fmt: skip
    if "@" in mode:  # router@0.05[@0.5]: the router skipping under that estimated pass rate [neighbours from 0.5]
        rate, *similarity = mode.split("@")[1:]
        extra["CACHECADE_CASCADE_ROUTER_MAX_PASS_RATE"] = rate
        if similarity:
            extra["CACHECADE_CASCADE_ROUTER_MIN_SIMILARITY"] = similarity[0]
    if args.gates:
        extra["CACHECADE_CASCADE_THRESHOLDS"] = args.gates
    if mode == "router+learning":
        extra |= {"CACHECADE_CACHE_MAX_ERROR": repr(args.delta), "CACHECADE_CACHE_SHADOW_SHARE": repr(args.shadow),
                  "CACHECADE_CACHE_SHADOW_MAX_SHARE": repr(args.shadow_cap)}  # fmt: skip
    return extra


@contextlib.contextmanager
def real_and_proxy(workdir: Path, extra: dict[str, str]) -> Iterator[str]:
    """A real upstream (a second `cachecade serve`, local-only, answering with Gemma 3 270M, as bench.cascade
    uses) and the measured proxy in front of it; yields the proxy's base URL."""
    upstream, upstream_url = serve(workdir, "upstream-gemma3", big_upstream_settings())
    try:
        proxy, url, log = start_proxy(workdir, f"{upstream_url}/v1", 0.95, {"CACHECADE_ADMIN_TOKEN": ADMIN, **extra})
        try:
            wait_until_up(f"{url}/readyz", proxy, log, 300)
            yield url
        finally:
            stop(proxy)
    finally:
        stop(upstream)


async def replay(url: str, mode: str, items: list[QAItem], oracle: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model = "oracle" if mode == "upstream-only" else "cachecade/auto"
    rows = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for i, item in enumerate(items):
            body = {"model": model, "messages": messages(item.question), "temperature": 0, "max_tokens": MAX_TOKENS}
            started = time.perf_counter()
            r = await client.post("/v1/chat/completions", headers=HEADERS, json=body)
            ms = (time.perf_counter() - started) * 1000
            r.raise_for_status()
            served = r.headers["x-served-by"]
            text = r.json()["choices"][0]["message"]["content"] or ""
            graded = served.startswith("local:") or not oracle  # the oracle's own answers are right
            rows.append({"i": i, "ms": ms, "served_by": served, "escalated": r.headers.get("x-escalated", ""),
                         "right": is_correct(text, item) if graded else True})  # fmt: skip
            if (i + 1) % 50 == 0:
                say(f"{mode}: {i + 1}/{len(items)}")
        admin = {"authorization": f"Bearer {ADMIN}"}
        final = {"learning": (await client.get("/admin/learning", headers=admin)).json(),
                 "stats": (await client.get("/admin/stats", headers=admin)).json(),
                 "cascade": (await client.get("/admin/cascade", headers=admin)).json()}  # fmt: skip
    return rows, final


def run(mode: str, items: list[QAItem], args: argparse.Namespace) -> dict[str, Any]:
    gold = {item.question: gold_text(item) for item in items}
    oracle = args.upstream == "oracle"
    with tempfile.TemporaryDirectory() as work:
        servers = (
            oracle_and_proxy(Path(work), gold, settings_for(mode, args))
            if oracle
            else real_and_proxy(Path(work), settings_for(mode, args))
        )
        with servers as url:
            started = time.monotonic()
            rows, final = asyncio.run(replay(url, mode, items, oracle))
            seconds = time.monotonic() - started
    learning, stats = final["learning"], final["stats"]
    local_scopes = {s: v for s, v in learning["scopes"].items() if s.startswith("local:")}
    shadow = learning["stats"]["shadow"]
    return {"mode": mode, "seconds": round(seconds, 1), "rows": rows,
            "gates": final["cascade"]["namespace_thresholds"] or final["cascade"]["thresholds"],
            "decisions": {s: v["decision"] for s, v in local_scopes.items()},
            "labels": {s: {"labels": v["labels"], "bad": v["bad"]} for s, v in local_scopes.items()},
            "router": stats["cascade"]["router"], "escalation_labels": learning["stats"]["escalations"],
            "shadow": shadow, "upstream_answers": learning["stats"]["upstream_answers"]}  # fmt: skip


def summarise(report: dict[str, Any], warmup: int, window: int) -> None:
    """Add the figures the issue asks for to each run (in place)."""
    runs = {r["mode"]: r for r in report["runs"]}
    base = runs["cascade"]["rows"]
    unanswerable = {r["i"] for r in base if not r["served_by"].startswith("local:")}
    base_local = {r["i"] for r in base if r["served_by"].startswith("local:")}
    up = [r["ms"] for r in runs["upstream-only"]["rows"] if r["i"] in unanswerable and r["i"] >= warmup]
    report["unanswerable"], report["upstream_p50_unanswerable"] = len(unanswerable), percentile(up, 50)
    for run_ in report["runs"]:
        rows = run_["rows"]
        late = [r["ms"] for r in rows if r["i"] in unanswerable and r["i"] >= warmup]
        local = [r for r in rows if r["served_by"].startswith("local:")]
        wrong = sum(not r["right"] for r in local)
        kept = {r["i"] for r in local} & base_local
        run_ |= {"p50": percentile([r["ms"] for r in rows], 50), "p95": percentile([r["ms"] for r in rows], 95),
                 "p50_unanswerable_after_warmup": percentile(late, 50),
                 "accuracy": sum(r["right"] for r in rows) / len(rows), "local_answers": len(local),
                 "local_wrong": wrong, "local_error_ci": wilson(wrong, len(local)),
                 "kept_of_cascade_local": [len(kept), len(base_local)],
                 "shadow_share_of_upstream": run_["shadow"]["checks"] / max(1, run_["upstream_answers"])}  # fmt: skip
        run_["windows"] = []
        for start in range(0, len(rows), window):
            chunk = rows[start : start + window]
            loc = [r for r in chunk if r["served_by"].startswith("local:")]
            run_["windows"].append({"upto": start + len(chunk), "p50": percentile([r["ms"] for r in chunk], 50),
                                    "local": len(loc), "wrong": sum(not r["right"] for r in loc),
                                    "skipped": sum("skipped-by-router" in r["escalated"] for r in chunk)})  # fmt: skip


def table(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']}", f"upstream: {report.get('upstream', 'oracle')}",
             f"questions: {report['questions']} ({report['per_dataset']} each from {', '.join(DATASETS)}, "
             f"{report.get('easy', 0)} capital cities; seed "
             f"{report['seed']}); gates {report['gates']}; warm-up {report['warmup']} requests; delta "
             f"{report['delta']:.1%}; shadow share "
             f"{report['shadow']:.0%} of accepted local answers, capped at {report['shadow_cap']:.0%} of upstream "
             f"calls", f"questions no local tier answered in the cascade run: {report['unanswerable']}; upstream-only "
             f"p50 on them after warm-up: {report['upstream_p50_unanswerable']:.0f} ms", "",
             f"{'run':<16} {'p50':>6} {'p95':>6} {'p50 unans.':>10} {'vs up':>7} {'local':>5} {'wrong':>12} "
             f"{'kept':>7} {'shadow/up':>9} {'accuracy':>8} {'seconds':>7}"]  # fmt: skip
    for r in report["runs"]:
        lo, hi = r["local_error_ci"]
        kept, of = r["kept_of_cascade_local"]
        diff = r["p50_unanswerable_after_warmup"] - report["upstream_p50_unanswerable"]
        lines.append(f"{r['mode']:<16} {r['p50']:>6.0f} {r['p95']:>6.0f} {r['p50_unanswerable_after_warmup']:>10.0f} "
                     f"{diff:>+7.0f} {r['local_answers']:>5} {r['local_wrong']:>3} [{lo:.0%}-{hi:.0%}] "
                     f"{kept:>3}/{of:<3} {r['shadow_share_of_upstream']:>9.1%} {r['accuracy']:>8.1%} "
                     f"{r['seconds']:>7}")  # fmt: skip
    for r in report["runs"]:
        if r["mode"] == "upstream-only":
            continue
        lines.append(f"\n{r['mode']}: gates at the end {r['gates']}; router {r['router']}")
        lines.append(f"  local labels {r['labels']}; escalation comparisons {r['escalation_labels']}")
        for scope, decision in r["decisions"].items():
            if decision:
                lines.append(f"  {scope}: threshold {decision['threshold']:.4f} ({decision['reason']}), "
                             f"{decision['labels']} labels at it, {decision['errors']} wrong, "
                             f"bound {decision['bound']:.3f}")  # fmt: skip
        lines.append(f"  {'upto':>5} {'p50 ms':>7} {'local':>5} {'wrong':>5} {'skipped':>7}")
        lines += [f"  {w['upto']:>5} {w['p50']:>7.0f} {w['local']:>5} {w['wrong']:>5} {w['skipped']:>7}"
                  for w in r["windows"]]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--n", type=int, default=150, help="questions per data set")
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--delta", type=float, default=0.02)
    parser.add_argument("--shadow", type=float, default=0.5, help="share of accepted local answers shadow-checked")
    parser.add_argument("--shadow-cap", type=float, default=0.1, help="shadow calls: at most this share of upstream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upstream", choices=("oracle", "real"), default="oracle",
                        help="oracle: gold answers; real: Gemma 3 270M behind a second cachecade serve")  # fmt: skip
    runs_help = (
        f"of {', '.join(RUNS)}, router@RATE (skipping under that estimated pass rate) and "
        "router@RATE@COSINE (neighbours from that cosine); needs upstream-only and cascade"
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=runs_help)
    parser.add_argument("--gates", help='gate thresholds as JSON, e.g. \'{"smollm2": 0.6, "gemma3": 0.6}\' '
                        "(default: the shipped ones)")  # fmt: skip
    parser.add_argument("--name", default="learning_cascade", help="report name under bench/results")
    parser.add_argument("--easy", type=int, default=0,
                        help=f"add this many capital-city questions (at most {len(CAPITALS)})")  # fmt: skip
    args = parser.parse_args()
    items = [item for path in DATASETS.values() for item in load_qa(Path(args.data) / path, args.n, args.seed)]
    items += [QAItem(f"What is the capital of {country}?", (city,), "nq_open")
              for country, city in list(CAPITALS.items())[: args.easy]]  # fmt: skip
    random.Random(args.seed).shuffle(items)
    report: dict[str, Any] = {"machine": machine(), "questions": len(items), "per_dataset": args.n, "seed": args.seed,
                              "gates": args.gates or "shipped", "easy": args.easy, "upstream": args.upstream,
                              "warmup": args.warmup, "delta": args.delta, "shadow": args.shadow,
                              "shadow_cap": args.shadow_cap, "runs": []}  # fmt: skip
    for mode in args.runs.split(","):
        say(f"run: {mode}")
        report["runs"].append(run(mode, items, args))
    summarise(report, args.warmup, args.window)
    for r in report["runs"]:
        r["rows"] = [{k: (round(v, 1) if k == "ms" else v) for k, v in row.items()} for row in r["rows"]]
    path = write_report(args.name, report, table(report))
    plot_windows(
        report,
        path.with_suffix(".png"),
        ("p50 latency per window (ms)", lambda w: w["p50"]),
        ("local answers per window", lambda w: w["local"]),
    )


if __name__ == "__main__":
    main()
