"""Token-budget-aware decoding on GSM8K and SVAMP: output tokens, accuracy and latency per strategy.

On N problems from each data set (a seeded sample) a model answers with a short worked solution, graded by its
last number. Strategies:
  none       greedy, max_tokens 256 (the local tiers' default cap);
  clamp@F    max_tokens = max(16, F x the estimated answer length). The estimate is the proxy's own
             (proxy.estimate.from_neighbours): the similarity-weighted median length of the answers to the 8
             nearest *other* problems of the set (cosine >= 0.5, all-MiniLM-L6-v2), i.e. what the cache would
             hold after answering them; the prompt-based guess where none is near;
  hint       TALE: "use less than <estimate> tokens" after the question (local_models.budget.with_hint);
  hint+clamp both;
  direct     no worked solution: "answer with just the final number" (the extreme budget);
  vote@B     self-consistency under a budget of B = 3 x ceil(1.5 x estimate) tokens per problem: the samples
             local_models.budget.plan_decoding affords (up to 3), first greedy, then temperature 0.7, majority vote
             on the last number, early stop once the vote is decided.
The little local model (SmolLM2, in-process, the proxy's chat prompt) runs every strategy. The upstream (a real
OpenAI-compatible server: by default a local-only `cachecade serve` answering with Gemma 3 270M; --upstream for
another) runs none, clamp@F and hint over HTTP.

Greedy decoding with a lower max_tokens yields a prefix of the uncapped answer, so clamp@F on the local model is
computed from the `none` answers cut at the cap (re-tokenised), checked against real capped generations on
--verify problems. Prints a table, writes bench/results/budget.json and .txt and docs/budget_pareto.png.

  HF_HUB_OFFLINE=1 .venv/bin/python -m bench.budget --data ../shared/data [--n 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.cascade import MODEL_CACHE, big_upstream_settings, serve
from bench.common import machine, percentile, say, write_report
from cache.embedder import load_embedder
from cache.response_cache import Neighbour
from local_models.budget import plan_decoding, with_hint
from local_models.calibration import QAItem, load_qa
from local_models.confidence import number_text, vote, vote_decided
from local_models.engine import Generation, LlamaEngine, Sampling
from local_models.processes import stop
from local_models.registry import default_local_models
from proxy.estimate import from_neighbours, from_prompt
from proxy.spending import MIN_NEIGHBOUR_SIMILARITY, NEIGHBOURS

ROOT = Path(__file__).resolve().parent.parent
PLOT = ROOT / "docs" / "budget_pareto.png"
DATASETS = {"gsm8k": "gsm8k/test.jsonl", "svamp": "svamp/SVAMP.json"}
SYSTEM = "Solve the problem. Reason briefly, step by step, then give the final answer as a number."
DIRECT = "Answer with just the final number, no explanation."
MAX_TOKENS = 256
CLAMP_MIN = 16
VOTE_K = 3


@dataclass(frozen=True)
class Answer:
    """One strategy's answer to one problem."""

    correct: bool
    tokens: int  # completion tokens, every sample included
    ms: float
    finish: str
    text: str = ""


def correct(text: str, item: QAItem) -> bool:
    """The answer's last number equals the gold one."""
    value = number_text(text, last=True)
    return value is not None and item.number is not None and abs(float(value) - item.number) < 1e-6


def chat(question: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


# --- estimates ------------------------------------------------------------------------------------------------


def estimates(items: Sequence[QAItem], lengths: Sequence[int], vectors: np.ndarray) -> list[tuple[int, str]]:
    """Per problem, the proxy's estimate from the other problems' answer lengths (leave one out)."""
    out: list[tuple[int, str]] = []
    similarities = vectors @ vectors.T
    for i, item in enumerate(items):
        order = [j for j in np.argsort(-similarities[i]) if j != i][:NEIGHBOURS]
        near = [Neighbour(float(similarities[i, j]), lengths[j]) for j in order
                if similarities[i, j] >= MIN_NEIGHBOUR_SIMILARITY]  # fmt: skip
        estimate = from_neighbours(near) or from_prompt(item.question)
        out.append((estimate.tokens, estimate.source))
    return out


def cap(estimate: int, factor: float) -> int:
    return min(MAX_TOKENS, max(CLAMP_MIN, math.ceil(factor * estimate)))


# --- the local model ------------------------------------------------------------------------------------------


def generate(engine: LlamaEngine, messages: list[dict[str, str]], sampling: Sampling) -> Generation:
    return engine.generate(engine.chat_prompt(messages), sampling)


def local_answer(engine: LlamaEngine, item: QAItem, max_tokens: int, hint: int | None = None,
                 system: str = SYSTEM) -> Answer:  # fmt: skip
    messages = chat(item.question, system)
    if hint is not None:
        messages = with_hint("chat", {"messages": messages}, hint)["messages"]
    g = generate(engine, messages, Sampling(max_tokens))
    return Answer(correct(g.text, item), g.completion_tokens, g.seconds * 1000, g.finish_reason, g.text)


def cut(engine: LlamaEngine, answer: Answer, item: QAItem, limit: int) -> Answer:
    """What greedy decoding with max_tokens = limit gives: the uncapped answer's first `limit` tokens."""
    if answer.tokens <= limit:
        return answer
    tokens = engine.llm.tokenize(answer.text.encode(), add_bos=False, special=True)[:limit]
    text = engine.llm.detokenize(tokens).decode("utf-8", "ignore")
    return Answer(correct(text, item), limit, answer.ms * limit / answer.tokens, "length", text)


def local_vote(engine: LlamaEngine, item: QAItem, estimate: int) -> Answer:
    budget = VOTE_K * math.ceil(1.5 * estimate)
    plan = plan_decoding(VOTE_K, MAX_TOKENS, budget, estimate)
    prompt = engine.chat_prompt(chat(item.question))
    texts, tokens, ms = [], 0, 0.0
    for i in range(plan.samples):
        g = engine.generate(prompt, Sampling(plan.max_tokens, 0.0 if i == 0 else 0.7, seed=i))
        texts.append(g.text)
        tokens, ms = tokens + g.completion_tokens, ms + g.seconds * 1000
        if plan.samples > 1 and vote_decided(texts, plan.samples):
            break
    chosen = texts[vote(texts, plan.samples)[0]]
    return Answer(correct(chosen, item), tokens, ms, "stop", chosen)


def run_local(items: Sequence[QAItem], vectors: np.ndarray, factors: Sequence[float], verify: int, threads: int,
              vote_n: int) -> tuple[dict[str, list[Answer]], list[tuple[int, str]], dict[str, Any]]:  # fmt: skip
    config = default_local_models()["smollm2"].model_copy(update={"threads": threads})
    engine = LlamaEngine.load("smollm2", config, MODEL_CACHE)
    out: dict[str, list[Answer]] = {"none": []}
    for done, item in enumerate(items, 1):
        out["none"].append(local_answer(engine, item, MAX_TOKENS))
        if done % 50 == 0:
            say(f"  none {done}/{len(items)}")
    est = estimates(items, [a.tokens for a in out["none"]], vectors)
    for factor in factors:
        out[f"clamp@{factor:g}"] = [cut(engine, a, it, cap(e, factor)) for a, it, (e, _) in
                                    zip(out["none"], items, est, strict=True)]  # fmt: skip
    checked = verify_cuts(engine, items, out, est, factors[len(factors) // 2], verify)
    out["hint"] = [local_answer(engine, it, MAX_TOKENS, hint=e) for it, (e, _) in zip(items, est, strict=True)]
    say("  hint done")
    best = factors[len(factors) // 2]
    out[f"hint+clamp@{best:g}"] = [cut(engine, a, it, cap(e, best)) for a, it, (e, _) in
                                   zip(out["hint"], items, est, strict=True)]  # fmt: skip
    out["direct"] = [local_answer(engine, it, MAX_TOKENS, system=DIRECT) for it in items]
    voted = list(zip(items, est, strict=True))[:vote_n]  # the vote is the costly one: optionally fewer problems
    out["vote@3x1.5est"] = [local_vote(engine, it, e) for it, (e, _) in voted]
    say("  vote done")
    return out, est, checked


def verify_cuts(engine: LlamaEngine, items: Sequence[QAItem], out: Mapping[str, list[Answer]],
                est: Sequence[tuple[int, str]], factor: float, n: int) -> dict[str, Any]:  # fmt: skip
    """Generate for real, with max_tokens = the cap, the first n problems the clamp cut; count identical texts."""
    cut_at = [i for i, a in enumerate(out[f"clamp@{factor:g}"]) if a.finish == "length"][:n]
    same = 0
    for i in cut_at:
        real = local_answer(engine, items[i], cap(est[i][0], factor))
        same += real.text.strip() == out[f"clamp@{factor:g}"][i].text.strip() or real.correct == out[
            f"clamp@{factor:g}"][i].correct  # fmt: skip
    return {"factor": factor, "checked": len(cut_at), "same_grade_or_text": same}


# --- the upstream ---------------------------------------------------------------------------------------------


async def upstream_answer(client: httpx.AsyncClient, url: str, model: str, item: QAItem, max_tokens: int,
                          hint: int | None = None) -> Answer:  # fmt: skip
    body: dict[str, Any] = {"model": model, "messages": chat(item.question), "temperature": 0,
                            "max_tokens": max_tokens}  # fmt: skip
    if hint is not None:
        body = with_hint("chat", body, hint)
    started = time.perf_counter()
    r = await client.post(f"{url}/chat/completions", json=body, headers={"cache-control": "no-store, no-cache"})
    ms = (time.perf_counter() - started) * 1000
    r.raise_for_status()
    payload = r.json()
    text = payload["choices"][0]["message"].get("content") or ""
    tokens = int(payload.get("usage", {}).get("completion_tokens") or 0)
    return Answer(correct(text, item), tokens, ms, payload["choices"][0].get("finish_reason") or "?", text)


async def run_upstream(url: str, model: str, items: Sequence[QAItem], est: Sequence[tuple[int, str]],
                       factor: float) -> dict[str, list[Answer]]:  # fmt: skip
    out: dict[str, list[Answer]] = {"none": [], f"clamp@{factor:g}": [], "hint": []}
    async with httpx.AsyncClient(timeout=300) as client:
        for item, (e, _) in zip(items, est, strict=True):
            out["none"].append(await upstream_answer(client, url, model, item, MAX_TOKENS))
            out[f"clamp@{factor:g}"].append(await upstream_answer(client, url, model, item, cap(e, factor)))
            out["hint"].append(await upstream_answer(client, url, model, item, MAX_TOKENS, hint=e))
    return out


# --- report ---------------------------------------------------------------------------------------------------


def summary(answers: Sequence[Answer], baseline: Sequence[Answer]) -> dict[str, Any]:
    """Accuracy and tokens of a strategy, against `none` on the same problems (the first len(answers))."""
    baseline = baseline[: len(answers)]
    tokens, base = sum(a.tokens for a in answers), sum(a.tokens for a in baseline)
    return {"n": len(answers), "accuracy": sum(a.correct for a in answers) / len(answers),
            "baseline_accuracy": sum(a.correct for a in baseline) / len(baseline),
            "mean_tokens": tokens / len(answers), "token_change": tokens / base - 1 if base else 0.0,
            "p50_ms": percentile([a.ms for a in answers], 50),
            "cut_at_cap": sum(a.finish == "length" for a in answers) / len(answers)}  # fmt: skip


def rows(results: Mapping[str, Mapping[str, Mapping[str, list[Answer]]]]) -> list[dict[str, Any]]:
    out = []
    for model, by_dataset in results.items():
        for dataset, by_strategy in by_dataset.items():
            for strategy, answers in by_strategy.items():
                out.append({"model": model, "dataset": dataset, "strategy": strategy,
                            **summary(answers, by_strategy["none"])})  # fmt: skip
    return out


def render(table: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'model':<10} {'data':<6} {'strategy':<16} {'n':>4} {'acc':>6} {'Δacc':>6} {'tokens':>7} "
             f"{'Δtokens':>8} {'cut':>5} {'p50 ms':>7}"]  # fmt: skip
    for r in table:
        delta = (r["accuracy"] - r["baseline_accuracy"]) * 100
        lines.append(f"{r['model']:<10} {r['dataset']:<6} {r['strategy']:<16} {r['n']:>4} {r['accuracy']:>6.1%} "
                     f"{delta:>+6.1f} {r['mean_tokens']:>7.1f} {r['token_change']:>+8.1%} {r['cut_at_cap']:>5.0%} "
                     f"{r['p50_ms']:>7.0f}")  # fmt: skip
    return "\n".join(lines)


def plot(table: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["dataset"]) for r in table})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (model, dataset) in zip(axes[0], groups, strict=True):
        for r in (r for r in table if (r["model"], r["dataset"]) == (model, dataset)):
            ax.scatter(r["mean_tokens"], r["accuracy"] * 100)
            ax.annotate(r["strategy"], (r["mean_tokens"], r["accuracy"] * 100), fontsize=7)
        ax.set_title(f"{model} / {dataset}")
        ax.set_xlabel("output tokens per problem")
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--n", type=int, default=200, help="problems per data set (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factors", default="1,1.5,2", help="clamp factors (default 1,1.5,2)")
    p.add_argument("--verify", type=int, default=10, help="capped answers to re-generate for real (default 10)")
    p.add_argument("--upstream", help="OpenAI-compatible base URL (default: start Gemma 3 270M behind cachecade)")
    p.add_argument("--upstream-model", default="cachecade/auto")
    p.add_argument("--no-upstream", action="store_true", help="measure the local model only")
    p.add_argument("--datasets", default=",".join(DATASETS), help="which data sets (default gsm8k,svamp)")
    p.add_argument("--vote-n", type=int, help="problems the vote strategy runs on (default: all --n)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads of the local model (default 2)")
    p.add_argument("--out", default="budget", help="result name under bench/results (default budget)")
    p.add_argument("--merge", nargs="+", help="combine result files of runs per data set into --out, and plot")
    return p.parse_args(argv)


def merge(paths: Sequence[str], out: str) -> int:
    """One report (table, JSON, plot) from runs made per data set, e.g. side by side on the two cores."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**reports[0], "runs": [r["args"] for r in reports]}
    for key in ("rows",):
        merged[key] = [row for r in reports for row in r[key]]
    for key in ("estimate_sources", "clamp_checks"):
        merged[key] = {k: v for r in reports for k, v in r[key].items()}
    merged["answers"] = {}
    for r in reports:
        for model, by_dataset in r["answers"].items():
            merged["answers"].setdefault(model, {}).update(by_dataset)
    merged["rows"].sort(key=lambda row: (row["model"], row["dataset"]))
    write_report(out, merged, render(merged["rows"]))
    plot(merged["rows"], PLOT)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = arguments(argv)
    if args.merge:
        return merge(args.merge, args.out)
    factors = [float(f) for f in args.factors.split(",")]
    embedder = load_embedder("all-MiniLM-L6-v2", "onnx", MODEL_CACHE)
    results: dict[str, dict[str, dict[str, list[Answer]]]] = {"smollm2": {}, "upstream": {}}
    checks, sources = {}, {}
    items_by: dict[str, list[QAItem]] = {}
    for name in args.datasets.split(","):
        items = load_qa(args.data / DATASETS[name])
        random.Random(args.seed).shuffle(items)
        items_by[name] = items[: args.n]
        vectors = np.asarray(embedder.encode([it.question for it in items_by[name]]), dtype=np.float32)
        say(f"{name}: {args.n} problems, local model")
        results["smollm2"][name], est, checks[name] = run_local(items_by[name], vectors, factors, args.verify,
                                                                args.threads, args.vote_n or args.n)  # fmt: skip
        sources[name] = {s: sum(1 for _, src in est if src == s) for s in ("neighbours", "prompt")}
        if not args.no_upstream:
            say(f"{name}: upstream")
            results["upstream"][name] = asyncio.run(upstream(args, items_by[name], est, factors[len(factors) // 2]))
    if args.no_upstream:
        del results["upstream"]
    table = rows(results)
    text = render(table)
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": table,
              "estimate_sources": sources, "clamp_checks": checks,
              "answers": {m: {d: {s: [asdict(replace(a, text=a.text[:200])) for a in v] for s, v in by.items()}
                              for d, by in ds.items()} for m, ds in results.items()}}  # fmt: skip
    write_report(args.out, report, text)
    if args.out == "budget":
        plot(table, PLOT)
    return 0


async def upstream(args: argparse.Namespace, items: Sequence[QAItem], est: Sequence[tuple[int, str]],
                   factor: float) -> dict[str, list[Answer]]:  # fmt: skip
    if args.upstream:
        return await run_upstream(args.upstream.rstrip("/"), args.upstream_model, items, est, factor)
    with tempfile.TemporaryDirectory() as tmp:
        gemma = default_local_models()["gemma3"].model_copy(update={"threads": args.threads})
        settings = {**big_upstream_settings(), "local_models": json.dumps({"gemma3": gemma.model_dump(mode="json")})}
        process, url = serve(Path(tmp), "upstream", settings)
        try:
            return await run_upstream(f"{url}/v1", args.upstream_model, items, est, factor)
        finally:
            stop(process)


if __name__ == "__main__":
    raise SystemExit(main())
