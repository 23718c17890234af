"""llama.cpp builds compared: generated and prompt tokens/s of the packaged models per build and thread count,
through our engine (greedy, with per-token logprobs, as the local tiers serve).

Each build is a llama-cpp-python wheel (deploy/llama_wheel.sh makes them: `LLAMA_CMAKE_ARGS=... bash
deploy/llama_wheel.sh` prints the wheel's path). It is unpacked into a folder of its own and every measurement runs
in a child process that imports it from there, so the venv is left alone and a build that crashes on this CPU
is recorded as crashed (with its signal) instead of ending the bench. With no --wheel, the installed build is
measured.

    python -m bench.llama_builds --wheel portable=PATH --wheel native=PATH [--threads 1 2] [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import machine, write_report

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
LONG_PROMPT = "The keeper wrote in the log every night, noting the wind, the sea and the ships that passed. " * 12


def measure(model: str, threads: int, tokens: int, runs: int, model_cache: str) -> dict[str, Any]:
    """In the child: medians over `runs` of generated tokens/s (llama.cpp's own eval timer), our end-to-end
    tokens/s (prompt included, as a request sees it) and prompt tokens/s on a ~230-token prompt."""
    import llama_cpp

    from local_models.engine import LlamaEngine, Sampling
    from local_models.registry import default_local_models

    config = default_local_models()[model].model_copy(update={"threads": threads})
    engine = LlamaEngine.load(model, config, Path(model_cache))
    ctx, prompt = engine.llm._ctx.ctx, engine.chat_prompt(STORY)
    long_tokens = engine.llm.tokenize(LONG_PROMPT.encode(), add_bos=True)
    engine.generate(prompt, Sampling(max_tokens=8))  # warm-up
    generated, end_to_end, prompt_speed = [], [], []
    for _ in range(runs):
        llama_cpp.llama_perf_context_reset(ctx)
        g = engine.generate(prompt, Sampling(max_tokens=tokens))
        perf = llama_cpp.llama_perf_context(ctx)
        generated.append(perf.n_eval / perf.t_eval_ms * 1000)
        end_to_end.append(g.completion_tokens / g.seconds)
        engine.llm.reset()
        started = time.perf_counter()
        engine.llm.eval(long_tokens)
        prompt_speed.append(len(long_tokens) / (time.perf_counter() - started))
    return {"generated_tok_s": statistics.median(generated), "end_to_end_tok_s": statistics.median(end_to_end),
            "prompt_tok_s": statistics.median(prompt_speed), "system_info": llama_cpp.llama_print_system_info()
            .decode().strip()}  # fmt: skip


def unpack(wheel: Path, into: Path) -> Path:
    """The wheel's files in a folder of their own (a wheel is a zip with the package at its root)."""
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    for lib in (into / "llama_cpp" / "lib").glob("*.so*"):
        lib.chmod(0o755)
    return into


def run_child(site: Path | None, args: list[str], timeout_s: float) -> dict[str, Any]:
    """One measurement in a child importing llama_cpp from `site` (None: the venv's own)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path.cwd()), env.get("PYTHONPATH", "")])
    try:
        out = subprocess.run([sys.executable, "-m", "bench.llama_builds", "--child", *args], env=env,
                             capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"crashed": f"no answer in {timeout_s:g} s"}
    if out.returncode < 0:
        return {"crashed": signal.Signals(-out.returncode).name}
    if out.returncode != 0:
        return {"crashed": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", action="append", default=[], help="NAME=PATH of a llama-cpp-python wheel")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "cachecade"))
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "THREADS", "TOKENS", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, threads, tokens, runs = args.child
        print(json.dumps(measure(model, int(threads), int(tokens), int(runs), args.model_cache)))
        return
    builds: dict[str, Path | None] = {"installed": None}
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "tokens": args.tokens, "builds": {}}
    with tempfile.TemporaryDirectory() as scratch:
        if args.wheel:
            builds = {}
            for spec in args.wheel:
                name, _, path = spec.partition("=")
                builds[name] = unpack(Path(path), Path(scratch) / name)
                report["builds"][name] = {"wheel": Path(path).name, "cmake_args": _cmake_args(Path(path))}
        results = []
        for name, site in builds.items():
            for threads in args.threads:
                for model in ("smollm2", "gemma3"):
                    child = [model, str(threads), str(args.tokens), str(args.runs)]
                    result = run_child(site, child, 600)
                    results.append({"build": name, "threads": threads, "model": model, **result})
                    print(name, threads, model, {k: v for k, v in result.items() if k != "system_info"}, flush=True)
    report["results"] = results
    write_report("llama_builds", report, table(results))


def _cmake_args(wheel: Path) -> str:
    flags = wheel.parent / "cmake-args"
    return flags.read_text().strip() if flags.is_file() else "unknown"


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'build':<10} {'threads':>7} {'model':<8} {'generated tok/s':>15} {'end-to-end tok/s':>16} "
             f"{'prompt tok/s':>12}"]  # fmt: skip
    for r in results:
        if "crashed" in r:
            lines.append(f"{r['build']:<10} {r['threads']:>7} {r['model']:<8} crashed: {r['crashed']}")
            continue
        lines.append(f"{r['build']:<10} {r['threads']:>7} {r['model']:<8} {r['generated_tok_s']:>15.1f} "
                     f"{r['end_to_end_tok_s']:>16.1f} {r['prompt_tok_s']:>12.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
