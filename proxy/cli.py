"""The `cachecade` command: `serve` runs the proxy, `calibrate` measures cache thresholds on labelled pairs,
`compress` measures what a compressed model costs and buys (`compress embedder`: int8 against fp32;
`compress gguf`: a local model re-quantised by llama.cpp)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cache import EMBEDDER_BACKENDS
from proxy import cli_cascade, cli_verifier

if TYPE_CHECKING:
    from cache.calibration import Pair

_Subcommands = argparse._SubParsersAction  # argparse's type for `add_subparsers()`, public in practice

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
  cache_ttl_s, cache_max_entries, cache_max_temperature, cache_tool_calls, embedder, ivf_threshold
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
    from proxy.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    # log_config=None: uvicorn's loggers (access log included) go through the handler configured above.
    # On SIGTERM uvicorn stops accepting and waits up to the grace (whole seconds, rounded up) for requests in flight.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None, timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))  # fmt: skip
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


def _model_cache() -> str:
    return str(Path.home() / ".cache" / "cachecade")


def _read_pairs(args: argparse.Namespace, command: str) -> list[Pair] | None:
    """The pairs of --pairs (sampled with --limit), or None after saying why they cannot be read."""
    from cache.calibration import load_pairs

    try:
        return load_pairs(Path(args.pairs), limit=args.limit, seed=args.seed)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"cachecade {command}: cannot read {args.pairs}: {exc}", file=sys.stderr)
        return None


def _write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


def _calibrate(args: argparse.Namespace) -> int:
    from cache.calibration import calibrate, render_table
    from cache.embedder import load_embedder

    pairs = _read_pairs(args, "calibrate")
    if pairs is None:
        return 2
    embedder = load_embedder(args.embedder, args.backend, Path(args.model_cache))
    verifier = None
    if args.verifier != "off":
        from cache.verifier import PairVerifier

        folder = None if args.verifier == "default" else Path(args.verifier)
        verifier = PairVerifier.load(folder, Path(args.model_cache))
    band = verifier.meta.band_low if verifier else 0.8
    report = calibrate(pairs, embedder, args.thresholds, args.max_false_hit, verifier, band)
    print(render_table(report))
    _write_json(args.json, report)
    return 0


def _compress_embedder(args: argparse.Namespace) -> int:
    from cache.compression import embedder_report, render_embedder_report
    from proxy.config import Settings

    pairs = _read_pairs(args, "compress embedder") if args.pairs else []
    if pairs is None:
        return 2
    threads = Settings.model_fields["embedder_threads"].default  # timed as served
    report = embedder_report(args.embedder, Path(args.model_cache), threads, pairs, args.queries)
    print(render_embedder_report(report))
    _write_json(args.json, report)
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


def _key_id(args: argparse.Namespace) -> int:
    from proxy.context import key_id

    key = (args.key if args.key is not None else sys.stdin.readline()).strip()
    if not key:
        print("cachecade key-id: no key given", file=sys.stderr)
        return 2
    print(key_id(key))
    return 0


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
                         "95% Wilson intervals; recommend the lowest threshold meeting --max-false-hit.")  # fmt: skip
    cal.add_argument("--pairs", required=True, help="JSON file: a list of {text_a, text_b, label}")
    cal.add_argument("--max-false-hit", type=float, default=0.01, help="target false-hit rate (default 0.01)")
    cal.add_argument("--thresholds", type=_thresholds, default=_thresholds("0.80:0.99:0.01"),
                     help="START:STOP:STEP of cosine thresholds (default 0.80:0.99:0.01)")  # fmt: skip
    cal.add_argument("--limit", type=int, help="use a random sample of this many pairs (fixed seed)")
    cal.add_argument("--seed", type=int, default=0, help="seed for --limit sampling (default 0)")
    cal.add_argument("--embedder", default="all-MiniLM-L6-v2", help="packaged embedder name or model directory")
    cal.add_argument("--backend", choices=EMBEDDER_BACKENDS, default="onnx", help="embedder backend (onnx)")
    cal.add_argument("--model-cache", default=_model_cache(), help="where the ONNX export is kept")
    cal.add_argument("--verifier", default="default", help="also measure cosine + this verifier on the same pairs: "
                     "'default' (shipped), an artifact folder, or 'off'")  # fmt: skip
    cal.add_argument("--json", help="also write the report as JSON to this path")
    cal.set_defaults(run=_calibrate)
    cli_cascade.add_parser(sub)
    cli_verifier.add_parser(sub)
    kid = sub.add_parser("key-id", help="print the id of an API key (budgets are set per key id)",
                         description="Print the id cachecade knows an API key by (a hash; keys are never stored). "
                         "Use it in key_limits and /admin/budgets. Reads the key from stdin when none is given, "
                         "so it stays out of shell history.")  # fmt: skip
    kid.add_argument("key", nargs="?", help="the API key (default: read one line from stdin)")
    kid.set_defaults(run=_key_id)

    compress = _compress_group(sub)
    _add_compress_embedder(compress)
    _add_compress_gguf(compress)
    return top


def _compress_group(sub: _Subcommands) -> _Subcommands:
    """`cachecade compress MODEL`: one subcommand per kind of model that can be compressed."""
    group = sub.add_parser(
        "compress",
        help="measure what a compressed model costs and buys",
        description="Compare a compressed model with the one it replaces, on the same inputs.",
    )
    return group.add_subparsers(dest="model", required=True, metavar="MODEL")


def _add_compress_embedder(compress: _Subcommands) -> None:
    emb = compress.add_parser(
        "embedder",
        help="int8 embedder (backend onnx-int8) against fp32 (onnx)",
        description="Compare the int8-quantised ONNX embedder with fp32: file size, single-query latency p50/p99 "
        "and queries/s (threads as served), and with --pairs the lowest threshold (0.80:0.99:0.005) whose "
        "false-hit rate is <= 2%, the hit rate there, int8's hit rate at fp32's threshold, and the cosine "
        "between their vectors.",
    )
    emb.add_argument("--pairs", help="JSON file: a list of {text_a, text_b, label} (QQP pairs)")
    emb.add_argument("--limit", type=int, help="use a random sample of this many pairs (fixed seed)")
    emb.add_argument("--seed", type=int, default=0, help="seed for --limit sampling (default 0)")
    emb.add_argument("--queries", type=int, default=300, help="single queries timed per embedder (default 300)")
    emb.add_argument("--embedder", default="all-MiniLM-L6-v2", help="packaged embedder name or model directory")
    emb.add_argument("--model-cache", default=_model_cache(), help="where the ONNX files are kept")
    emb.add_argument("--json", help="also write the report as JSON to this path")
    emb.set_defaults(run=_compress_embedder)


def _compress_gguf(args: argparse.Namespace) -> int:
    from local_models.calibration import load_qa
    from local_models.compress import QuantizeError
    from local_models.compress_report import Bench, compare, default_qa, render_table, resolve_model
    from local_models.registry import ModelNotFound

    try:
        src, prompt = resolve_model(args.model, args.prompt, Path(args.model_cache))
        qa = load_qa(Path(args.qa), limit=args.qa_limit) if args.qa else default_qa()
        bench = Bench(prompt, tuple(qa), args.threads, args.n_ctx, speed_rounds=args.speed_rounds)
        out = Path(args.out) if args.out else Path(args.model_cache) / "gguf"
        report = compare(src, [t.strip() for t in args.types.split(",") if t.strip()], out, bench)
    except (ModelNotFound, QuantizeError, OSError, ValueError, KeyError) as exc:
        print(f"cachecade compress gguf: {exc}", file=sys.stderr)
        return 2
    print(render_table(report))
    _write_json(args.json, report.to_json())
    return 0


def _add_compress_gguf(compress: _Subcommands) -> None:
    gguf = compress.add_parser(
        "gguf",
        help="re-quantise a local GGUF model with llama.cpp and compare the files",
        description="Re-quantise a GGUF model to each of --types and compare it with the source on the same "
        "inputs: file size, greedy decode tokens/s, perplexity on a fixed English text and accuracy on a small "
        "QA sample. Types llama.cpp refuses for the model are skipped and said so. Quality is bounded by the "
        "source: the packaged files are already 4-bit, so a Q8_0 made from them cannot be better.",
    )
    gguf.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a .gguf path (default smollm2)")
    gguf.add_argument("--types", required=True, help="comma-separated llama.cpp types, e.g. Q8_0,Q4_0,Q2_K")
    gguf.add_argument("--out", help="where the files are written (default MODEL_CACHE/gguf)")
    gguf.add_argument("--prompt", choices=["chat", "few-shot"], help="QA prompt style (default: the model's own)")
    gguf.add_argument("--qa", help="QA JSON lines in nq_open's format instead of the built-in 30 questions")
    gguf.add_argument("--qa-limit", type=int, help="use the first N questions of --qa")
    gguf.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    gguf.add_argument("--n-ctx", type=int, default=512, help="perplexity window in tokens (default 512)")
    gguf.add_argument("--speed-rounds", type=int, default=5, help="interleaved decode-speed runs per file (5)")
    gguf.add_argument("--model-cache", default=_model_cache(), help="where files derived from packages are kept")
    gguf.add_argument("--json", help="also write the report as JSON to this path")
    gguf.set_defaults(run=_compress_gguf)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
