"""`cachecade calibrate-cascade`: measure the local tiers on labelled questions and pick their gate thresholds."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Run each local tier (greedy, one short system prompt) on labelled questions: NQ-open (.jsonl with question and
answer aliases), SVAMP (.json list with Body, Question, Answer) or GSM8K (.jsonl, answer ending '#### N').
Thresholds are chosen in route order: the first tier's on every question, the next tier's on the questions the
first escalated, and so on; each is the lowest confidence score at which the answers the gate accepts are right
at least --target-precision of the time (with at least --min-accepted of them). Prints per tier the threshold,
the accepted share, the accepted accuracy (95% Wilson interval) and the escalation rate, then the setting to
apply: CACHECADE_CASCADE_THRESHOLDS='{...}'. With --router, every graded answer (the question's embedding, the
gate's score, whether it was right) is also written to the router's memory in the entry store `cachecade serve`
uses (CACHECADE_REDIS_URL, else CACHECADE_DATA_DIR), so the router starts from what this run learnt.
"""


def _tiers(text: str) -> list[str]:
    from local_models.registry import default_local_models

    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in default_local_models()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"tiers are packaged local models ({', '.join(default_local_models())})")
    return names


def _precision(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError("a precision is in (0, 1]")
    return value


def _run(args: argparse.Namespace) -> int:
    from local_models.calibration import calibrate, load_qa, progress_printer, render_table, run_tier
    from local_models.engine import LlamaEngine
    from local_models.errors import LocalModelError
    from local_models.registry import ModelNotFound, default_local_models

    items = []
    for path in args.qa:
        try:
            items += load_qa(Path(path), limit=args.limit, seed=args.seed)
        except (OSError, ValueError) as exc:
            print(f"cachecade calibrate-cascade: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    records = {}
    for name in args.tiers:
        try:
            engine = LlamaEngine.load(name, default_local_models()[name], Path(args.model_cache))
        except (ModelNotFound, LocalModelError) as exc:
            print(f"cachecade calibrate-cascade: {exc}", file=sys.stderr)
            return 2
        say = progress_printer(name, len(items), lambda line: print(line, file=sys.stderr, flush=True))
        records[name] = run_tier(engine, items, args.max_tokens, args.system, say)
        del engine  # one model in memory at a time
    report = calibrate(items, records, args.target_precision, args.min_accepted)
    print(render_table(report))
    if args.router:
        print(f"router: {asyncio.run(_seed_router(items, records))} graded answers written to its memory")
    if args.json:
        report["records"] = {n: [r.as_dict() | {"question": i.question, "dataset": i.dataset}
                                 for r, i in zip(rs, items, strict=True)] for n, rs in records.items()}  # fmt: skip
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


async def _seed_router(items: list[Any], records: dict[str, list[Any]]) -> int:
    """Write every graded answer to the router's shared memory in the store the proxy is configured with."""
    from cache.embedder import load_embedder
    from proxy.app import open_stores
    from proxy.config import Settings
    from proxy.router import Router

    settings = Settings()
    embedder = load_embedder(settings.embedder, settings.embedder_backend, settings.model_cache_dir,
                             settings.embedder_threads)  # fmt: skip
    vectors = embedder.encode([item.question for item in items])  # what the cache embeds: the last user message
    store, counters = await open_stores(settings)
    try:
        router = Router(store=store)
        for name, answers in records.items():
            router.seed(name, vectors, [r.score for r in answers], [r.passes(0.0) for r in answers],
                        [r.correct for r in answers])  # fmt: skip
        await router.sync()
        if router.stats.synced["errors"]:
            raise RuntimeError("the entry store refused the router's samples (see the log)")
        return router.stats.synced["written"]
    finally:
        await store.close()
        await counters.close()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `calibrate-cascade` on the `cachecade` command line."""
    from local_models.calibration import MAX_TOKENS, SYSTEM_PROMPT

    cmd = sub.add_parser("calibrate-cascade", help="pick the cascade's confidence thresholds on labelled questions",
                         description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    cmd.add_argument("--qa", action="append", required=True, help="NQ-open, SVAMP or GSM8K file (repeatable)")
    cmd.add_argument("--target-precision", type=_precision, required=True,
                     help="accuracy the answers a tier accepts must reach, e.g. 0.8")  # fmt: skip
    cmd.add_argument("--tiers", type=_tiers, default=["smollm2", "gemma3"], help="route order (smollm2,gemma3)")
    cmd.add_argument("--limit", type=int, help="a random sample of this many questions per file (fixed seed)")
    cmd.add_argument("--seed", type=int, default=0, help="seed for --limit sampling (default 0)")
    cmd.add_argument("--min-accepted", type=int, default=10, help="fewest accepted answers a threshold needs (10)")
    cmd.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help=f"answer cap ({MAX_TOKENS})")
    cmd.add_argument("--system", default=SYSTEM_PROMPT, help=f"system prompt (default: {SYSTEM_PROMPT!r})")
    cmd.add_argument("--model-cache", default=str(Path.home() / ".cache" / "cachecade"),
                     help="where Gemma's joined GGUF is kept")  # fmt: skip
    cmd.add_argument("--router", action="store_true", help="also write the graded answers to the router's memory "
                     "in the proxy's entry store (Redis or the data dir, from the CACHECADE_ settings)")  # fmt: skip
    cmd.add_argument("--json", help="also write the report (with every graded answer) as JSON to this path")
    cmd.set_defaults(run=_run)
