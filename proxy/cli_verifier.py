"""`cachecade train-verifier`: train the semantic cache's verifier on labelled pairs (cache/verifier_training.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DESCRIPTION = """\
Fine-tune the verifier (a cross-encoder on the packaged embedder's first layers) on labelled pairs plus hard
pairs generated from their questions (word swaps, changed numbers, negations, units; casing, punctuation,
contractions and polite wrappers), calibrate its score on held-out pairs and pick the threshold that keeps false
hits within --max-false-hit there. Pairs: JSON list or JSON lines of {text_a, text_b, label}, or an STS-B .csv.
Writes the artifact folder; serve it with CACHECADE_CACHE_VERIFIER=FOLDER. Same data and seed, same artifact
(give --threads 1 for bit-for-bit reproducibility across machines).
"""


def _run(args: argparse.Namespace) -> int:
    import torch

    from cache.embedder import load_embedder
    from cache.verifier_training import recalibrate, train

    missing = [p for p in args.pairs if not Path(p).is_file()]
    if missing:
        print(f"cachecade train-verifier: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    embedder = load_embedder("all-MiniLM-L6-v2", "onnx", Path(args.model_cache))
    if args.recalibrate:
        meta = recalibrate([Path(p) for p in args.pairs], Path(args.out), embedder.encode, seed=args.seed,
                           max_false_hit=args.max_false_hit, progress=not args.quiet)  # fmt: skip
        print(json.dumps({"int8": meta.int8}, indent=2))
        print(f"recalibrated {args.out} for int8 serving")
        return 0
    meta = train([Path(p) for p in args.pairs], Path(args.out), embedder.encode, seed=args.seed, epochs=args.epochs,
                 max_steps=args.max_steps, max_false_hit=args.max_false_hit, progress=not args.quiet)  # fmt: skip
    print(json.dumps({"threshold": meta.threshold, "platt": meta.platt, "int8": meta.int8, **meta.training},
                     indent=2))  # fmt: skip
    print(f"wrote {args.out}; serve it with CACHECADE_CACHE_VERIFIER={args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from proxy.cli import _model_cache

    p = sub.add_parser("train-verifier", help="train the semantic cache's verifier on labelled pairs",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--pairs", action="append", required=True, help="a pairs file (repeatable)")
    p.add_argument("--out", required=True, help="the artifact folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the generated pairs and training (0)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a quick run)")
    p.add_argument("--max-false-hit", type=float, default=0.01, help="false-hit rate the threshold keeps (0.01)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--model-cache", default=_model_cache(), help="where the embedder's ONNX export is kept")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--recalibrate", action="store_true", help="no training: fit the int8 calibration of the "
                   "artifact in --out (trained on the same --pairs and --seed) on its held-out pairs")  # fmt: skip
    p.set_defaults(run=_run)
