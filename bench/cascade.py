"""Accuracy, latency and upstream use of the big-little cascade, through HTTP with real processes.

On N questions each from NQ-open and SVAMP (a seeded sample), one measured `cachecade serve` (cache off, so every
request reaches the tiers) answers every question through four routes:
  little-only ["smollm2"], big-only ["gemma3"], upstream-only ["upstream"], cascade ["smollm2", "gemma3", "upstream"].
The cascade's thresholds come from `local_models.calibration` run first on a disjoint sample of the same data sets
(or from --thresholds). The default upstream is a second `cachecade serve`, local-only, answering every request
with Gemma 3 270M (a real OpenAI-compatible server running the big local model); --upstream points at another.
Requests are sequential and interleaved (each question through the four routes in turn). Prints a table, writes
bench/results/cascade.json and .txt, and plots accuracy against the share of upstream calls.

  HF_HUB_OFFLINE=1 .venv/bin/python -m bench.cascade --data ../shared/data [--n 300] [--seed 0]
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS, machine, percentile, say, write_report
from local_models.calibration import (
    MAX_TOKENS,
    QAItem,
    calibrate,
    is_correct,
    load_qa,
    messages,
    progress_printer,
    rate,
    render_table,
    run_tier,
)
from local_models.processes import free_port, stop, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path.home() / ".cache" / "cachecade"
PLOT = ROOT / "docs" / "cascade_accuracy.png"
DATASETS = {"nq_open": "nq_open/NQ-open.dev.jsonl", "svamp": "svamp/SVAMP.json"}
LOCAL_TIERS = ("smollm2", "gemma3")
CONFIGS = {"little-only": ["smollm2"], "big-only": ["gemma3"], "upstream-only": ["upstream"],
           "cascade": ["smollm2", "gemma3", "upstream"]}  # fmt: skip


# --- data and thresholds --------------------------------------------------------------------------------------


def samples(data: Path, n: int, calib_n: int, seed: int) -> tuple[dict[str, list[QAItem]], list[QAItem]]:
    """Per data set, N questions to measure and a disjoint `calib_n` to calibrate on (one seeded shuffle)."""
    measured: dict[str, list[QAItem]] = {}
    calibration: list[QAItem] = []
    for name, relative in DATASETS.items():
        items = load_qa(data / relative)
        random.Random(seed).shuffle(items)
        if len(items) < n + calib_n:
            raise SystemExit(f"{relative} has {len(items)} questions; --n + --calib-n needs {n + calib_n}")
        measured[name], calibration = items[:n], calibration + items[n : n + calib_n]
    return measured, calibration


def calibrated(items: Sequence[QAItem], target: float, min_accepted: int) -> dict[str, Any]:
    """The calibration report of the local tiers on `items` (one model loaded at a time)."""
    from local_models.engine import LlamaEngine
    from local_models.registry import default_local_models

    records = {}
    for name in LOCAL_TIERS:
        engine = LlamaEngine.load(name, default_local_models()[name], MODEL_CACHE)
        records[name] = run_tier(engine, items, MAX_TOKENS, progress=progress_printer(name, len(items), say, 50))
        del engine
    return calibrate(items, records, target, min_accepted)


# --- processes ------------------------------------------------------------------------------------------------


def serve(workdir: Path, name: str, settings: Mapping[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start `cachecade serve` with CACHECADE_* settings; returns the process and its base URL once ready."""
    port, log = free_port(), workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECADE_")}
    env |= {"HF_HUB_OFFLINE": "1", "CACHECADE_DATA_DIR": str(workdir / name), "CACHECADE_LOG_LEVEL": "warning",
            "CACHECADE_MODEL_CACHE_DIR": str(MODEL_CACHE), "CACHECADE_CACHE_EXACT_ENABLED": "false",
            "CACHECADE_CACHE_SEMANTIC_ENABLED": "false"}  # fmt: skip
    env |= {f"CACHECADE_{k.upper()}": v for k, v in settings.items()}
    script = Path(sys.executable).parent / "cachecade"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]
    with log.open("w") as out:
        process = subprocess.Popen([*launcher, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/readyz", process, log, timeout=300)
    except Exception:
        stop(process)
        raise
    return process, url


def big_upstream_settings() -> dict[str, str]:
    """A local-only server answering every request with Gemma 3 270M (no upstream of its own)."""
    return {"cascade_routes": json.dumps({"cachecade/auto": ["gemma3"]})}


def measured_settings(upstream_v1: str, upstream_model: str, thresholds: Mapping[str, float]) -> dict[str, str]:
    """The measured proxy: one route per configuration, the calibrated thresholds, the upstream."""
    return {"upstream_base_url": upstream_v1, "cascade_upstream_model": upstream_model,
            "cascade_routes": json.dumps(CONFIGS), "cascade_thresholds": json.dumps(dict(thresholds))}  # fmt: skip


# --- measuring ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request's outcome."""

    config: str
    dataset: str
    correct: bool
    ms: float
    served_by: str
    upstream_tokens: int  # completion tokens the upstream produced for it (0 when served locally)


async def ask(client: httpx.AsyncClient, base: str, config: str, item: QAItem) -> Sample:
    """Send one question through one configuration's route and grade the answer."""
    body = {"model": config, "messages": messages(item.question), "temperature": 0, "max_tokens": MAX_TOKENS}
    started = time.perf_counter()
    response = await client.post(f"{base}/v1/chat/completions", json=body)
    ms = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise SystemExit(f"{config} answered {response.status_code}: {response.text[:500]}")
    payload = response.json()
    served = response.headers.get("x-served-by", "?")
    tokens = int((payload.get("usage") or {}).get("completion_tokens") or 0) if served.startswith("upstream") else 0
    text = payload["choices"][0]["message"].get("content") or ""
    return Sample(config, item.dataset, is_correct(text, item), ms, served, tokens)


def schedule(questions: Sequence[QAItem]) -> list[list[tuple[str, QAItem]]]:
    """Per step, the (configuration, question) requests to send: every configuration in turn, interleaved so load
    changes hit all of them alike. The cascade runs one question behind: llama.cpp reuses the KV cache of the
    longest prompt prefix it just processed, so right after little-only's and big-only's run on the same question
    its local tiers would skip prompt processing and look faster than they are."""
    steps: list[list[tuple[str, QAItem]]] = []
    for i in range(len(questions) + 1):
        step = [(c, questions[i]) for c in CONFIGS if c != "cascade"] if i < len(questions) else []
        steps.append(step + ([("cascade", questions[i - 1])] if i else []))
    return steps


async def measure(base: str, measured: Mapping[str, list[QAItem]]) -> list[Sample]:
    """Every question through every configuration, sequentially."""
    out: list[Sample] = []
    questions = [item for items in zip(*measured.values(), strict=True) for item in items]
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as client:
        for done, step in enumerate(schedule(questions)):
            out += [await ask(client, base, config, item) for config, item in step]
            if done in (5, 20) or (done and done % 50 == 0) or done == len(questions):  # `done` fully answered
                each = (time.monotonic() - started) / done
                say(f"{done}/{len(questions)} questions, {each:.1f}s each, ~{each * (len(questions) - done):.0f}s left")
    return out


def summarise(samples: Sequence[Sample], dataset: str, config: str) -> dict[str, Any]:
    """One table row: accuracy, latency, escalation and upstream use of a configuration on a data set."""
    rows = [s for s in samples if s.config == config and (dataset == "all" or s.dataset == dataset)]
    first = CONFIGS[config][0]
    upstream = [s for s in rows if s.served_by.startswith("upstream")]
    escalated = [s for s in rows if not s.served_by.startswith("upstream" if first == "upstream" else f"local:{first}")]
    ms = [s.ms for s in rows]
    return {"dataset": dataset, "config": config, "n": len(rows),
            "accuracy": rate(sum(s.correct for s in rows), len(rows)),
            "p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "escalated": rate(len(escalated), len(rows)), "upstream_share": rate(len(upstream), len(rows)),
            "upstream_calls": len(upstream), "upstream_completion_tokens": sum(s.upstream_tokens for s in upstream),
            "served_by": dict(sorted({s.served_by: sum(x.served_by == s.served_by for x in rows)
                                      for s in rows}.items()))}  # fmt: skip


def table_rows(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Rows per data set and overall, with upstream calls and tokens saved against upstream-only."""
    rows = []
    for dataset in [*DATASETS, "all"]:
        group = [summarise(samples, dataset, config) for config in CONFIGS]
        baseline = next(r for r in group if r["config"] == "upstream-only")
        for row in group:
            row["upstream_calls_saved"] = baseline["upstream_calls"] - row["upstream_calls"]
            row["upstream_tokens_saved"] = baseline["upstream_completion_tokens"] - row["upstream_completion_tokens"]
        rows += group
    return rows


# --- output ---------------------------------------------------------------------------------------------------


def _pct(r: Mapping[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:5.1f}% [{100 * lo:4.1f}-{100 * hi:4.1f}]"


def render(report: Mapping[str, Any]) -> str:
    """The bench table, with what it ran on."""
    head = (f"{'dataset':<8} {'config':<14} {'n':>4}  {'accuracy (95% CI)':<22} {'p50 ms':>7} {'p95 ms':>7}  "
            f"{'escalated':>9} {'upstream':>8} {'up calls':>8} {'up tokens':>9} {'calls saved':>11} "
            f"{'tokens saved':>12}")  # fmt: skip
    lines = [f"note: {report['note']}"] if report["note"] else []
    lines += [f"machine: {report['machine']}", f"upstream: {report['upstream']}",
             f"thresholds: {json.dumps(report['thresholds'])} ({report['thresholds_from']})", head]  # fmt: skip
    for r in report["rows"]:
        lines.append(f"{r['dataset']:<8} {r['config']:<14} {r['n']:>4}  {_pct(r['accuracy']):<22} {r['p50_ms']:>7.0f} "
                     f"{r['p95_ms']:>7.0f}  {100 * r['escalated']['rate']:>8.1f}% "
                     f"{100 * r['upstream_share']['rate']:>7.1f}% {r['upstream_calls']:>8} "
                     f"{r['upstream_completion_tokens']:>9} {r['upstream_calls_saved']:>11} "
                     f"{r['upstream_tokens_saved']:>12}")  # fmt: skip
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Accuracy against the share of requests sent upstream: one panel per data set, one point per configuration
    (nudged sideways a little so configurations at the same share stay visible)."""
    import matplotlib

    matplotlib.use("Agg")  # no display here
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(10, 4.2), sharey=True)
    nudge = dict(zip(CONFIGS, [-3.0, -1.0, 1.0, 3.0], strict=True))
    for ax, dataset in zip(axes, DATASETS, strict=True):
        for i, r in enumerate(r for r in rows if r["dataset"] == dataset):
            lo, hi = r["accuracy"]["ci95"]
            x, y = 100 * r["upstream_share"]["rate"] + nudge[r["config"]], 100 * r["accuracy"]["rate"]
            ax.errorbar(x, y, yerr=[[y - 100 * lo], [100 * hi - y]], fmt="o", color=f"C{i}", capsize=3,
                        label=r["config"])  # fmt: skip
        ax.set_title(f"{dataset} (n={rows[0]['n']})")
        ax.set_xlabel("requests sent upstream (%)")
        ax.set_xlim(-8, 108)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), 95% Wilson interval")
    axes[0].legend(fontsize=8)
    fig.suptitle("cachecade cascade: accuracy vs upstream use")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------------------


def arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder with nq_open/, svamp/")
    p.add_argument("--n", type=int, default=300, help="questions measured per data set (300)")
    p.add_argument("--calib-n", type=int, default=150, help="disjoint questions per data set to calibrate on (150)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    p.add_argument("--target-precision", type=float, default=0.5, help="calibration target precision (0.5)")
    p.add_argument("--min-accepted", type=int, default=10, help="fewest accepted answers per tier threshold (10)")
    p.add_argument("--thresholds", help='JSON thresholds instead of calibrating, e.g. {"smollm2":0.8,"gemma3":0.7}')
    p.add_argument("--upstream", help="another OpenAI-compatible /v1 URL instead of the local Gemma server")
    p.add_argument("--upstream-model", default="cachecade/auto", help="model to ask the upstream for")
    p.add_argument("--out", type=Path, default=RESULTS / "cascade.json", help="JSON output (.txt beside it)")
    p.add_argument("--plot", type=Path, default=PLOT, help="PNG output")
    p.add_argument("--note", default="", help="a line to keep with the results (e.g. why --n is smaller)")
    return p.parse_args(argv)


def thresholds(args: argparse.Namespace, calibration: Sequence[QAItem]) -> tuple[dict[str, float], Any, str]:
    """Given thresholds, or calibrated ones with their report."""
    if args.thresholds:
        return dict(json.loads(args.thresholds)), None, "given with --thresholds"
    say(f"calibrating on {len(calibration)} disjoint questions (target precision {args.target_precision})")
    report = calibrated(calibration, args.target_precision, args.min_accepted)
    print(render_table(report), flush=True)
    return report["thresholds"], report, f"calibrated on {len(calibration)} disjoint questions"


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Calibrate, start the servers, measure; returns the report."""
    load = os.getloadavg()  # the machine is shared: say how busy it was
    measured, calibration = samples(args.data, args.n, args.calib_n if not args.thresholds else 0, args.seed)
    limits, calibration_report, source = thresholds(args, calibration)
    started: list[subprocess.Popen[bytes]] = []
    try:
        upstream_v1 = args.upstream
        if upstream_v1 is None:
            process, url = serve(workdir, "upstream-gemma3", big_upstream_settings())
            started.append(process)
            upstream_v1 = f"{url}/v1"
        process, base = serve(workdir, "measured", measured_settings(upstream_v1, args.upstream_model, limits))
        started.append(process)
        say(f"servers up; measuring {sum(map(len, measured.values()))} questions x {len(CONFIGS)} configurations")
        data = await measure(base, measured)
    finally:
        for process in started:
            stop(process)
    upstream = args.upstream or "cachecade serve, local-only, route cachecade/auto -> gemma3 (few-shot)"
    box = machine() | {"loadavg_at_start": load, "loadavg_at_end": os.getloadavg()}
    return {"note": args.note, "machine": box, "upstream": upstream,
            "upstream_model": args.upstream_model, "data": {k: str(args.data / v) for k, v in DATASETS.items()},
            "n_per_dataset": args.n, "seed": args.seed, "max_tokens": MAX_TOKENS, "configs": CONFIGS,
            "thresholds": limits, "thresholds_from": source, "calibration": _without_records(calibration_report),
            "rows": table_rows(data)}  # fmt: skip


def _without_records(report: Any) -> Any:
    return {k: v for k, v in report.items() if k != "records"} if isinstance(report, dict) else report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench and write its outputs."""
    args = arguments(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cascade-") as workdir:
        report = asyncio.run(run(args, Path(workdir)))
    calibration = f"\n\ncalibration:\n{render_table(report['calibration'])}" if report["calibration"] else ""
    write_report("cascade", report, render(report) + calibration, args.out)
    plot(report["rows"], args.plot)
    say(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
