"""Local-tier speed: generated tokens/s of the packaged models, what the logprob signal costs, and the cascade's
overhead on an escalated request.

- tokens/s: greedy generation of a fixed number of tokens on a fixed prompt, through our token loop (which reads
  each sampled token's logprob from the last logits row), through llama-cpp-python's own completion (no
  logprobs), and through llama-cpp-python with `logits_all=True` and logprobs (its only way to get them).
- overhead: `Cascade.run` on a route [smollm2, upstream] whose gate rejects everything (so the request
  escalates): its wall time minus the generation time the engine measured inside it, per request, is what the
  local tier adds beyond the model's own generation (thread hop, queue, prompt rendering, confidence, gate).
  Measured in a fresh process. The same generation called directly on the main thread is shown for reference,
  measured after it: llama.cpp's
  OpenMP thread team belongs to the thread that calls it, and once two threads have called it the process has
  two teams and each generation got slower (2 threads: 78 ms from one thread, about 110 ms from either once both
  had called it; 1 thread: 105 ms either way). The served path only ever calls from the model's worker thread.

  python -m bench.local_tier [--runs 15] [--tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import machine, percentile, write_report
from local_models.cascade import CascadePolicy
from local_models.engine import LlamaEngine, Sampling
from local_models.isolation import ChildProcessWorker
from local_models.registry import default_local_models
from local_models.worker import ModelWorker
from proxy.cascade import Cascade

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
QUESTION = [{"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


def tokens_per_second(engine: LlamaEngine, tokens: int, runs: int) -> dict[str, float]:
    """Median generated tokens/s three ways on the same prompt."""
    prompt = engine.chat_prompt(STORY)
    ours, plain = [], []
    for _ in range(runs):
        g = engine.generate(prompt, Sampling(max_tokens=tokens))
        ours.append(g.completion_tokens / g.seconds)
        started = time.perf_counter()
        out = engine.llm.create_completion(prompt.text, max_tokens=tokens, temperature=0)
        plain.append(out["usage"]["completion_tokens"] / (time.perf_counter() - started))  # type: ignore[index]
    return {"ours_with_logprobs": statistics.median(ours), "llama_cpp_python_no_logprobs": statistics.median(plain)}


def logits_all_speed(path: Path, prompt: str, tokens: int, runs: int) -> float:
    """tokens/s of llama-cpp-python's own logprobs, which need logits_all=True."""
    from llama_cpp import Llama

    # n_ctx 512: logits_all keeps n_ctx x vocab floats (2 GB for Gemma 3 at 2048).
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    speeds = []
    for _ in range(runs):
        started = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=tokens, temperature=0, logprobs=1)
        speeds.append(out["usage"]["completion_tokens"] / (time.perf_counter() - started))  # type: ignore[index]
    return statistics.median(speeds)


async def overhead(engine: LlamaEngine, runs: int, worker: ModelWorker | None = None) -> dict[str, float]:
    """Median wall time of an escalating cascade run vs the bare generation (ms), through `worker` (default: the
    engine on a thread of this process)."""
    worker = worker or ModelWorker(engine)
    cascade = Cascade({"smollm2": worker}, CascadePolicy(routes={"a": ["smollm2", "upstream"]},
                                                         thresholds={"smollm2": 1.0}))  # fmt: skip
    route = cascade.route("a", True) or []
    body = {"model": "a", "messages": QUESTION, "max_tokens": 32}
    prompt = engine.chat_prompt(QUESTION)
    bare, through, extra, inside = [], [], [], []
    for _ in range(runs):  # the served path first: see the module docstring on OpenMP teams
        started = time.perf_counter()
        result = await cascade.run("chat", body, route, 32)
        wall = (time.perf_counter() - started) * 1000
        assert result.upstream is not None and result.answer is None  # it escalated
        through.append(wall)
        extra.append(wall - result.local_seconds * 1000)
        inside.append(result.local_seconds * 1000)
    for _ in range(runs):
        started = time.perf_counter()
        engine.generate(prompt, Sampling(max_tokens=32))
        bare.append((time.perf_counter() - started) * 1000)
    return {
        "direct_generation_p50_ms": statistics.median(bare),
        "worker_generation_p50_ms": statistics.median(inside),
        "cascade_escalated_p50_ms": statistics.median(through),
        "cascade_escalated_p95_ms": percentile(through, 95),
        "overhead_p50_ms": statistics.median(extra),
        "overhead_p95_ms": percentile(extra, 95),
    }


def _overhead_in_process(name: str, runs: int, model_cache: str, isolated: bool) -> dict[str, float]:
    config = default_local_models()[name]
    engine = LlamaEngine.load(name, config, Path(model_cache))
    if not isolated:
        return asyncio.run(overhead(engine, runs))
    worker = ChildProcessWorker(name, config, engine.path)  # the default served path: the model in a child
    worker.start()
    try:
        return asyncio.run(overhead(engine, runs, worker))
    finally:
        worker.close()


def served_overhead(name: str, runs: int, model_cache: str, isolated: bool = False) -> dict[str, float]:
    """`overhead` in a fresh process, so llama.cpp's OpenMP state is what a serving process has."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_overhead_in_process, name, runs, model_cache, isolated).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model-cache", default=str(Path.home() / ".cache" / "cachecade"))
    args = parser.parse_args()
    configs = default_local_models()
    report: dict[str, Any] = {"machine": machine(), "runs": args.runs, "tokens": args.tokens, "models": {}}
    for name in ("smollm2", "gemma3"):
        engine = LlamaEngine.load(name, configs[name], Path(args.model_cache))
        speeds = tokens_per_second(engine, args.tokens, args.runs)
        speeds["llama_cpp_python_logits_all_logprobs"] = logits_all_speed(
            engine.path, engine.chat_prompt(STORY).text, args.tokens, max(3, args.runs // 3)
        )
        report["models"][name] = speeds
        if name == "smollm2":
            report["overhead"] = served_overhead(name, args.runs, args.model_cache)
            report["overhead_isolated"] = served_overhead(name, args.runs, args.model_cache, isolated=True)
    lines = [f"machine: {report['machine']}", f"{args.tokens} greedy tokens, median of {args.runs} runs",
             f"{'model':<9} {'ours+logprobs':>14} {'llama-cpp-py':>13} {'logits_all+lp':>14}  (tokens/s)"]  # fmt: skip
    for name, s in report["models"].items():
        lines.append(f"{name:<9} {s['ours_with_logprobs']:>14.1f} {s['llama_cpp_python_no_logprobs']:>13.1f} "
                     f"{s['llama_cpp_python_logits_all_logprobs']:>14.1f}")  # fmt: skip
    o = report["overhead"]
    lines.append(
        f"escalated request, smollm2 then upstream: cascade p50 {o['cascade_escalated_p50_ms']:.1f} ms, of which "
        f"beyond generation p50 {o['overhead_p50_ms']:.2f} ms / p95 {o['overhead_p95_ms']:.2f} ms (generation on the "
        f"worker thread p50 {o['worker_generation_p50_ms']:.1f} ms; called directly on the main thread p50 "
        f"{o['direct_generation_p50_ms']:.1f} ms)"
    )
    i = report["overhead_isolated"]
    lines.append(
        f"the same with the model in a child process (the default): cascade p50 {i['cascade_escalated_p50_ms']:.1f} "
        f"ms, beyond generation p50 {i['overhead_p50_ms']:.2f} ms / p95 {i['overhead_p95_ms']:.2f} ms"
    )
    write_report("local_tier", report, "\n".join(lines))


if __name__ == "__main__":
    main()
