"""The `cachecade` command: `serve` runs the proxy, `calibrate` measures cache thresholds on labelled pairs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

SERVE_HELP = """\
Run the OpenAI-compatible proxy. Point clients at http://HOST:PORT/v1.

Every setting can also come from an environment variable (CACHECADE_<NAME>, e.g.
CACHECADE_UPSTREAM_BASE_URL) or from the YAML file given with --config (keys in lower case, e.g.
upstream_base_url). Precedence: command line, then environment, then the file, then the defaults.
Main settings:
  upstream_base_url   OpenAI-compatible backend for cache misses (unset: misses answer 503)
  upstream_api_key    key sent upstream (unset: the caller's Authorization header passes through)
  admin_token         bearer token of /admin, 16+ characters (unset: admin API disabled)
  data_dir            where the embedded store keeps its SQLite file
  cache_threshold     semantic hit threshold, cosine similarity in [0, 1] (higher = stricter)
  cache_ttl_s, cache_max_entries, cache_max_temperature, cache_tool_calls, embedder, hnsw_threshold
See README.md for the full list.
"""


def _serve(args: argparse.Namespace) -> int:
    from proxy.config import Settings

    overrides: dict[str, Any] = {k: v for k, v in
                                 {"host": args.host, "port": args.port, "config_file": args.config,
                                  "log_level": args.log_level}.items() if v is not None}  # fmt: skip
    try:
        settings = Settings(**overrides)
    except (ValidationError, ValueError) as exc:
        print(f"cachecade: invalid settings:\n{_explain(exc)}", file=sys.stderr)
        return 2
    import uvicorn

    from proxy.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)  # fmt: skip
    return 0


def _explain(exc: Exception) -> str:
    if not isinstance(exc, ValidationError):
        return f"  {exc}"
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        env = f"CACHECADE_{str(err['loc'][0]).upper()}" if err["loc"] else ""
        lines.append(f"  {name} ({env}): {err['msg']}" if env else f"  {name}: {err['msg']}")
    return "\n".join(lines)


def _calibrate(args: argparse.Namespace) -> int:
    from cache.calibration import calibrate, load_pairs, render_table
    from cache.embedder import load_embedder

    try:
        pairs = load_pairs(Path(args.pairs), limit=args.limit, seed=args.seed)
    except (OSError, ValueError) as exc:
        print(f"cachecade calibrate: cannot read {args.pairs}: {exc}", file=sys.stderr)
        return 2
    embedder = load_embedder(args.embedder, args.backend, Path(args.model_cache))
    report = calibrate(pairs, embedder, args.thresholds, args.max_false_hit)
    print(render_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


def _thresholds(text: str) -> list[float]:
    try:
        start, stop, step = (float(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected START:STOP:STEP, e.g. 0.80:0.99:0.01") from None
    if not (0 <= start <= stop <= 1 and step > 0):
        raise argparse.ArgumentTypeError("thresholds are cosines in [0, 1] with START <= STOP and STEP > 0")
    count = round((stop - start) / step) + 1
    return [round(start + i * step, 6) for i in range(count)]


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(prog="cachecade", description="LLM cost-and-latency proxy (OpenAI-compatible).")
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy", description=SERVE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    serve.add_argument("--port", type=int, help="port to bind (default 8080)")
    serve.add_argument("--config", help="YAML settings file (same names as the CACHECADE_ variables, lower case)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level (info)")
    serve.set_defaults(run=_serve)

    cal = sub.add_parser("calibrate", help="measure semantic-cache thresholds on labelled pairs",
                         description="Embed labelled pairs ({text_a, text_b, label} JSON) and print, per threshold, "
                         "the hit rate on duplicates, the false-hit rate on non-duplicates and the precision, with "
                         "95%% Wilson intervals; recommend the lowest threshold meeting --max-false-hit.")  # fmt: skip
    cal.add_argument("--pairs", required=True, help="JSON file: a list of {text_a, text_b, label}")
    cal.add_argument("--max-false-hit", type=float, default=0.01, help="target false-hit rate (default 0.01)")
    cal.add_argument("--thresholds", type=_thresholds, default=_thresholds("0.80:0.99:0.01"),
                     help="START:STOP:STEP of cosine thresholds (default 0.80:0.99:0.01)")  # fmt: skip
    cal.add_argument("--limit", type=int, help="use a random sample of this many pairs (fixed seed)")
    cal.add_argument("--seed", type=int, default=0, help="seed for --limit sampling (default 0)")
    cal.add_argument("--embedder", default="all-MiniLM-L6-v2", help="packaged embedder name or model directory")
    cal.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="embedder backend (onnx)")
    cal.add_argument("--model-cache", default=str(Path.home() / ".cache" / "cachecade"),
                     help="where the ONNX export is kept")  # fmt: skip
    cal.add_argument("--json", help="also write the report as JSON to this path")
    cal.set_defaults(run=_calibrate)
    return top


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
