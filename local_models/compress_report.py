"""`cachecade compress gguf`'s report: the source GGUF and each re-quantised file measured on the same inputs
(file size, greedy decode tokens/s, perplexity on a fixed text, accuracy on a small QA sample)."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from local_models.calibration import QAItem, is_correct, messages
from local_models.compress import QuantizeError, Requantized, decode_speeds, ftype, ftype_name, perplexity, requantize
from local_models.engine import Sampling
from local_models.registry import LocalModelConfig, PromptStyle

if TYPE_CHECKING:
    from local_models.engine import LlamaEngine


QA_SYSTEM = "Answer the question with a short phrase or a number only."


def qa_accuracy(engine: LlamaEngine, items: Sequence[QAItem], max_tokens: int = 24) -> float:
    """Share of `items` the engine answers right (graded as `cachecade calibrate-cascade` grades), greedy, one
    question per conversation."""
    right = 0
    for item in items:
        prompt = engine.chat_prompt(messages(item.question, QA_SYSTEM))
        text = engine.generate(prompt, Sampling(max_tokens=max_tokens)).text
        right += is_correct(text.strip().split("\n")[0], item)  # the first line: what a short answer is
    return right / len(items) if items else 0.0


def default_qa() -> list[QAItem]:
    """The built-in QA sample (30 short factual and arithmetic questions)."""
    from local_models.compress_samples import QA_SAMPLE

    return [QAItem(question, tuple(answers), "nq_open") for question, answers in QA_SAMPLE]


@dataclass(frozen=True)
class Bench:
    """The fixed inputs every file is measured on."""

    prompt: PromptStyle = "chat"
    qa: tuple[QAItem, ...] = ()
    threads: int = 2
    n_ctx: int = 512  # perplexity window
    decode_tokens: int = 64
    speed_rounds: int = 5


@dataclass(frozen=True)
class FileMeasure:
    """One file's row of the comparison."""

    label: str
    path: str
    file_type: str
    size_mb: float
    tokens_per_second: float
    perplexity: float
    qa_accuracy: float
    fallback: str  # tensors that got another type than asked, e.g. "180/272 -> q4_0"


@dataclass(frozen=True)
class Skipped:
    """A type llama.cpp refused for this model, and why."""

    qtype: str
    reason: str


@dataclass
class CompressReport:
    """The source and each re-quantised file, measured on the same inputs."""

    source: str
    bench: dict[str, object]
    machine: dict[str, object]
    rows: list[FileMeasure] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        """The report as plain JSON data."""
        return asdict(self)


def measure(path: Path, label: str, bench: Bench, speed: float, fallback: str = "") -> FileMeasure:
    """Size, QA accuracy and perplexity of one GGUF file, with its decode speed measured beside the others'."""
    from local_models.compress_samples import PERPLEXITY_TEXT
    from local_models.engine import LlamaEngine

    engine = LlamaEngine(label, LocalModelConfig(path=str(path), prompt=bench.prompt, threads=bench.threads), path)
    try:
        file_type = ftype_name(int(engine.llm.metadata.get("general.file_type", -1)))
        accuracy = qa_accuracy(engine, bench.qa)
    finally:
        engine.llm.close()
    ppl = perplexity(path, PERPLEXITY_TEXT, bench.n_ctx, bench.threads)
    size = path.stat().st_size / 1e6
    return FileMeasure(label, str(path), file_type, round(size, 1), round(speed, 1), round(ppl, 3), accuracy, fallback)


def compare(src: Path, qtypes: Sequence[str], out_dir: Path, bench: Bench) -> CompressReport:
    """Measure `src` and each type re-quantised from it into `out_dir`; types llama.cpp refuses are skipped."""
    from local_models.compress_samples import SPEED_PROMPT

    for qtype in qtypes:
        ftype(qtype)  # an unknown name fails before any work
    report = CompressReport(str(src), _bench_json(bench), machine())
    files: dict[str, tuple[Path, str]] = {"source": (src, "")}
    for qtype in qtypes:
        dst = out_dir / f"{src.name.removesuffix('.gguf')}.{qtype.upper()}.gguf"
        try:
            made = requantize(src, dst, qtype, bench.threads)
        except QuantizeError as exc:
            report.skipped.append(Skipped(qtype.upper(), str(exc)))
            continue
        files[made.qtype] = (made.path, _fallback(made))
    paths = {label: path for label, (path, _) in files.items()}
    speeds = decode_speeds(paths, SPEED_PROMPT, bench.decode_tokens, bench.speed_rounds, bench.threads)
    report.rows = [measure(path, label, bench, speeds[label], note) for label, (path, note) in files.items()]
    report.machine["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return report


def _fallback(made: Requantized) -> str:
    if not made.fallback_tensors:
        return ""
    types = ", ".join(f"{count} {name}" for name, count in made.fallback_types.items())
    return f"{made.fallback_tensors}/{made.tensors}: {types or '?'}"


def _bench_json(bench: Bench) -> dict[str, object]:
    from local_models.compress_samples import PERPLEXITY_TEXT, SPEED_PROMPT

    return {"prompt": bench.prompt, "qa_items": len(bench.qa), "threads": bench.threads, "ppl_n_ctx": bench.n_ctx,
            "ppl_text_chars": len(PERPLEXITY_TEXT), "decode_tokens": bench.decode_tokens,
            "speed_rounds": bench.speed_rounds,
            "speed_prompt": SPEED_PROMPT}  # fmt: skip


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import llama_cpp

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # The load average says how much the timings shared the CPUs with other work.
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus_available": cpus, "load_average_1m_at_start": round(os.getloadavg()[0], 2),
            "llama_cpp_python": llama_cpp.__version__}  # fmt: skip


def render_table(report: CompressReport) -> str:
    """The comparison as a fixed-width table, with what it ran on."""
    bench, host = report.bench, report.machine
    lines = [
        f"source: {report.source}",
        f"machine: {host['cpu']}, {host['cpus_available']} CPUs (1-min load {host['load_average_1m_at_start']} at "
        f"start, {host.get('load_average_1m_at_end', '?')} at end), "
        f"llama-cpp-python {host['llama_cpp_python']}, llama.cpp threads: {bench['threads']}",
        f"inputs: perplexity on {bench['ppl_text_chars']} chars (windows of {bench['ppl_n_ctx']} tokens), "
        f"tok/s: median of {bench['speed_rounds']} interleaved runs of {bench['decode_tokens']} greedy tokens, "
        f"{bench['qa_items']} QA questions ({bench['prompt']})",
        "",
        f"{'file':<8} {'type':<8} {'size MB':>8} {'tok/s':>7} {'perplexity':>11} {'QA acc':>7}  fallback",
    ]
    for row in report.rows:
        lines.append(f"{row.label:<8} {row.file_type:<8} {row.size_mb:>8.1f} {row.tokens_per_second:>7.1f} "
                     f"{row.perplexity:>11.3f} {row.qa_accuracy:>7.1%}  {row.fallback or '-'}")  # fmt: skip
    lines += [f"skipped {s.qtype}: {s.reason}" for s in report.skipped]
    return "\n".join(lines)


def resolve_model(model: str, prompt: PromptStyle | None, cache_dir: Path | None = None) -> tuple[Path, PromptStyle]:
    """The GGUF file for a packaged name (`smollm2`, `gemma3`) or a path, and its prompt style (the packaged
    model's own unless `prompt` is given; chat for a path)."""
    from local_models.registry import default_local_models

    packaged = default_local_models().get(model)
    config = LocalModelConfig(path=model, prompt=prompt or (packaged.prompt if packaged else "chat"))
    return config.gguf(cache_dir), config.prompt
