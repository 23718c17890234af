"""The int8 embedder (backend onnx-int8) against fp32 (onnx) on QQP pairs: file size, single-query latency with the
server's thread setting, and the hit rate at the shipped 2 % false-hit target. The same report as
`cachecade compress embedder`; this adds the machine and the data it ran on and keeps the results.

Targets: int8 at least 2x faster per query (p50), and its hit rate at the 2 % false-hit target within 2 points
of fp32's.

  HF_HUB_OFFLINE=1 .venv/bin/python -m bench.embedder_int8 --data ../shared/data [--limit N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.common import machine, write_report
from cache.calibration import load_pairs
from cache.compression import embedder_report, render_embedder_report
from cache.embedder import DEFAULT_EMBEDDER
from proxy.config import Settings


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--limit", type=int, help="sample this many QQP pairs (seed 0); all 40,447 take ~7 min here")
    parser.add_argument("--queries", type=int, default=1000, help="single queries timed per embedder (1000)")
    parser.add_argument("--model-cache", type=Path, default=Path.home() / ".cache" / "cachecade")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/embedder_int8.json; .txt beside)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    source = args.data / "qqp_pairs" / "pairs.json"
    pairs = load_pairs(source, limit=args.limit, seed=0)
    threads = Settings.model_fields["embedder_threads"].default  # the server's default, timed as served
    start = time.perf_counter()
    report = embedder_report(DEFAULT_EMBEDDER, args.model_cache, threads, pairs, args.queries)
    sample = f"a seed-0 sample of {len(pairs)} pairs (--limit {args.limit})" if args.limit else "all pairs"
    report["bench"] = {"machine": machine(), "data": str(source.relative_to(args.data)), "pairs_used": sample,
                       "queries_timed": args.queries, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    text = f"QQP ({report['bench']['data']}, {sample}); machine: {report['bench']['machine']}\n"
    text += render_embedder_report(report)
    write_report("embedder_int8", report, text, args.out)


if __name__ == "__main__":
    main()
