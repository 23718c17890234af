"""The cascade half of learning from traffic: does the router take the local tiers' latency off questions they
cannot answer, while keeping the local answers the gate accepts, and do learnt gates hold the error target?

- **Questions** (fixed seed): N each from NQ-open and SVAMP, shuffled, each asked once as
  `local_models.calibration.messages` asks it. `cache-control: no-store`: the cache embeds every question (the
  router reads that embedding) but stores nothing, so every request reaches the cascade.
- **Upstream**: bench/oracle_upstream.py answering each question with its gold answer (the first NQ alias, the
  SVAMP number), so escalation comparisons and shadow checks are exact labels, and every local answer is graded
  with `calibration.is_correct`.
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
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import machine, percentile, say, write_report
from bench.learning import ADMIN, oracle_and_proxy
from cache.calibration import wilson
from local_models.calibration import MAX_TOKENS, QAItem, is_correct, load_qa, messages

DATASETS = {"nq_open": "nq_open/NQ-open.dev.jsonl", "svamp": "svamp/SVAMP.json"}
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
    if mode == "router+learning":
        extra |= {"CACHECADE_CACHE_MAX_ERROR": repr(args.delta), "CACHECADE_CACHE_SHADOW_SHARE": repr(args.shadow),
                  "CACHECADE_CACHE_SHADOW_MAX_SHARE": repr(args.shadow_cap)}  # fmt: skip
    return extra


async def replay(url: str, mode: str, items: list[QAItem]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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
            rows.append({"i": i, "ms": ms, "served_by": served, "escalated": r.headers.get("x-escalated", ""),
                         "right": is_correct(text, item) if served.startswith("local:") else True})  # fmt: skip
            if (i + 1) % 50 == 0:
                say(f"{mode}: {i + 1}/{len(items)}")
        admin = {"authorization": f"Bearer {ADMIN}"}
        final = {"learning": (await client.get("/admin/learning", headers=admin)).json(),
                 "stats": (await client.get("/admin/stats", headers=admin)).json(),
                 "cascade": (await client.get("/admin/cascade", headers=admin)).json()}  # fmt: skip
    return rows, final


def run(mode: str, items: list[QAItem], args: argparse.Namespace) -> dict[str, Any]:
    gold = {item.question: gold_text(item) for item in items}
    with tempfile.TemporaryDirectory() as work, oracle_and_proxy(Path(work), gold, settings_for(mode, args)) as url:
        started = time.monotonic()
        rows, final = asyncio.run(replay(url, mode, items))
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
                 "local_answers": len(local), "local_wrong": wrong, "local_error_ci": wilson(wrong, len(local)),
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
    lines = [f"machine: {report['machine']}",
             f"questions: {report['questions']} ({report['per_dataset']} each from {', '.join(DATASETS)}, seed "
             f"{report['seed']}); warm-up {report['warmup']} requests; delta {report['delta']:.1%}; shadow share "
             f"{report['shadow']:.0%} of accepted local answers, capped at {report['shadow_cap']:.0%} of upstream "
             f"calls", f"questions no local tier answered in the cascade run: {report['unanswerable']}; upstream-only "
             f"p50 on them after warm-up: {report['upstream_p50_unanswerable']:.0f} ms", "",
             f"{'run':<16} {'p50':>6} {'p95':>6} {'p50 unans.':>10} {'vs up':>7} {'local':>5} {'wrong':>12} "
             f"{'kept':>7} {'shadow/up':>9} {'seconds':>7}"]  # fmt: skip
    for r in report["runs"]:
        lo, hi = r["local_error_ci"]
        kept, of = r["kept_of_cascade_local"]
        diff = r["p50_unanswerable_after_warmup"] - report["upstream_p50_unanswerable"]
        lines.append(f"{r['mode']:<16} {r['p50']:>6.0f} {r['p95']:>6.0f} {r['p50_unanswerable_after_warmup']:>10.0f} "
                     f"{diff:>+7.0f} {r['local_answers']:>5} {r['local_wrong']:>3} [{lo:.0%}-{hi:.0%}] "
                     f"{kept:>3}/{of:<3} {r['shadow_share_of_upstream']:>9.1%} {r['seconds']:>7}")  # fmt: skip
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


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for r in report["runs"]:
        x = [w["upto"] for w in r["windows"]]
        top.plot(x, [w["p50"] for w in r["windows"]], marker="o", label=r["mode"])
        bottom.plot(x, [w["local"] for w in r["windows"]], marker="o", label=r["mode"])
    top.set_ylabel("p50 latency per window (ms)")
    bottom.set_ylabel("local answers per window")
    bottom.set_xlabel("requests")
    top.legend()
    fig.tight_layout()
    fig.savefig(path)


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
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    items = [item for path in DATASETS.values() for item in load_qa(Path(args.data) / path, args.n, args.seed)]
    random.Random(args.seed).shuffle(items)
    report: dict[str, Any] = {"machine": machine(), "questions": len(items), "per_dataset": args.n, "seed": args.seed,
                              "warmup": args.warmup, "delta": args.delta, "shadow": args.shadow,
                              "shadow_cap": args.shadow_cap, "runs": []}  # fmt: skip
    for mode in args.runs.split(","):
        say(f"run: {mode}")
        report["runs"].append(run(mode, items, args))
    summarise(report, args.warmup, args.window)
    for r in report["runs"]:
        r["rows"] = [{k: (round(v, 1) if k == "ms" else v) for k, v in row.items()} for row in r["rows"]]
    path = write_report("learning_cascade", report, table(report))
    plot(report, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
