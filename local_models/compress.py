"""Re-quantise a GGUF model with llama.cpp and measure what it costs: file size, decode speed, perplexity on a
fixed text and accuracy on a small fixed QA sample, each file on the same inputs.

The packaged files are already quantised (SmolLM2 Q4_1, Gemma 3 Q4_K_M), so every output is derived from those
weights: a "Q8_0" made from Q4_1 is bigger but cannot be better than its Q4_1 source. Only an F16/BF16 source
gives each type its real quality.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from local_models.errors import LocalModelError
from local_models.registry import LocalModelConfig, PromptStyle

if TYPE_CHECKING:
    from llama_cpp import Llama

    from local_models.engine import LlamaEngine

_FTYPE_PREFIXES = ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")
_FALLBACK_COUNT = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
_FALLBACK_TYPE = re.compile(r"falling back to\s+(\w+)")
_TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*(\d+)\]", re.MULTILINE)


class QuantizeError(LocalModelError):
    """A type llama.cpp does not know, or a quantisation it refused (e.g. a type that needs an importance matrix)."""

    reason = "quantize"


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name (Q8_0, Q4_K_M, F16, ...), as this llama-cpp-python build defines them."""
    import llama_cpp

    types: dict[str, int] = {}
    for attr in dir(llama_cpp):
        for prefix in _FTYPE_PREFIXES:
            if attr.startswith(prefix):
                types[attr.removeprefix(prefix)] = int(getattr(llama_cpp, attr))
    return types


def ftype(qtype: str) -> int:
    """The llama.cpp file type for a name such as `Q4_K_M` (case-insensitive); QuantizeError naming it if unknown."""
    types = quant_types()
    try:
        return types[qtype.upper()]
    except KeyError:
        raise QuantizeError(f"unknown quantisation type {qtype!r}; known: {', '.join(sorted(types))}") from None


def ftype_name(value: int) -> str:
    """The name of a llama.cpp file type number (`general.file_type` in GGUF metadata)."""
    return next((name for name, number in quant_types().items() if number == value), f"type {value}")


@dataclass(frozen=True)
class Requantized:
    """One written file and how much of it is really the type asked for."""

    path: Path
    qtype: str
    tensors: int
    fallback_tensors: int  # rows not a multiple of the type's block size get another type
    fallback_types: dict[str, int]  # the type each fell back to: tensors


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Keep llama.cpp's log lines instead of printing them: quantising logs every tensor, and the lines wanted are
    the one saying why it failed and the fallback summary."""
    import llama_cpp
    import llama_cpp._logger as default_log

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(default_log.llama_log_callback, ctypes.c_void_p(0))


def requantize(src: Path, dst: Path, qtype: str, threads: int = 2) -> Requantized:
    """Write `src` re-quantised to `qtype` at `dst` (atomically: a partial file never takes its name)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(qtype)
    params.nthread = threads
    params.allow_requantize = True  # the sources are already quantised; llama.cpp refuses them without this
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part")
    with _llama_log() as lines:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(part).encode(), ctypes.byref(params))
    log = "".join(lines)
    if status != 0:
        part.unlink(missing_ok=True)
        reasons = re.findall(r"failed to quantize: (.+)", log) or ["see llama.cpp's log"]
        raise QuantizeError(f"llama.cpp cannot quantise {src.name} to {qtype.upper()}: {reasons[-1].strip()}")
    os.replace(part, dst)
    return _requantized(dst, qtype.upper(), log)


def _requantized(path: Path, qtype: str, log: str) -> Requantized:
    counts = _FALLBACK_COUNT.search(log)
    totals = [int(n) for n in _TENSOR_LINE.findall(log)]
    fallback, tensors = (int(counts[1]), int(counts[2])) if counts else (0, max(totals, default=0))
    types = dict(Counter(_FALLBACK_TYPE.findall(log)).most_common())
    return Requantized(path, qtype, tensors, fallback, types)


def perplexity(model_path: Path, text: str, n_ctx: int = 512, threads: int = 2) -> float:
    """exp(mean negative log-likelihood) of `text`'s tokens, in independent windows of `n_ctx` tokens.

    Loads its own copy with `logits_all=True` (every position's logits are needed here, unlike serving)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
    try:
        bos = llm.tokenize(b"", add_bos=True)  # empty for models that take no BOS (SmolLM2)
        body = llm.tokenize(text.encode("utf-8"), add_bos=False)
        step = n_ctx - len(bos)
        total, count = 0.0, 0
        for start in range(0, len(body), step):
            window = bos + body[start : start + step]
            total += _window_nll(llm, window)
            count += len(window) - 1
    finally:
        llm.close()
    if count == 0:
        raise ValueError("the text is too short to measure perplexity")
    return float(np.exp(total / count))


def _window_nll(llm: Llama, tokens: list[int], rows: int = 64) -> float:
    """Summed NLL of tokens[1:], each predicted from the logits of the position before it."""
    llm.reset()
    llm.eval(tokens)
    targets = np.asarray(tokens[1:])
    total = 0.0
    for start in range(0, len(targets), rows):  # blocks of rows: a 262k vocabulary makes whole windows large
        logits = np.asarray(llm.scores[start : min(start + rows, len(targets))], dtype=np.float64)
        top = logits.max(axis=1)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        total += float((lse - logits[np.arange(len(logits)), targets[start : start + len(logits)]]).sum())
    return total


def tokens_per_second(llm: Llama, prompt: str, n_tokens: int = 64) -> float:
    """Greedy decode speed on `prompt` over `n_tokens` tokens after the first.

    The first token is left out (it pays for the prompt), and end-of-text does not stop the run, so every file
    decodes the same number of tokens."""
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True)
    generator = llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True)
    try:
        next(generator)
        started = time.perf_counter()
        for _, _token in zip(range(n_tokens), generator, strict=False):
            pass
        return n_tokens / (time.perf_counter() - started)
    finally:
        generator.close()


def decode_speeds(paths: Mapping[str, Path], prompt: str, n_tokens: int, rounds: int, threads: int) -> dict[str, float]:
    """Median tokens/s of each file over `rounds`, interleaved (each round runs every file once) so that load
    from other work on a shared machine falls on all files alike instead of on whichever ran during it."""
    from llama_cpp import Llama

    llms = {label: Llama(model_path=str(path), n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
            for label, path in paths.items()}  # fmt: skip
    speeds: dict[str, list[float]] = {label: [] for label in llms}
    try:
        for _ in range(rounds):
            for label, llm in llms.items():
                speeds[label].append(tokens_per_second(llm, prompt, n_tokens))
    finally:
        for llm in llms.values():
            llm.close()
    return {label: statistics.median(values) for label, values in speeds.items()}


@dataclass(frozen=True)
class QAItem:
    """A question and the answers that count as right (nq_open's `{question, answer: [...]}` shape)."""

    question: str
    answers: tuple[str, ...]


def normalise(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces: the SQuAD-style answer normalisation."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def is_correct(output: str, answers: Sequence[str]) -> bool:
    """Whether the output's first line holds one of the answers as whole words."""
    said = f" {normalise(output.strip().split(chr(10))[0])} "
    return any(f" {normalise(answer)} " in said for answer in answers if normalise(answer))


QA_SYSTEM = "Answer the question with a short phrase or a number only."


def qa_accuracy(engine: LlamaEngine, items: Sequence[QAItem], max_tokens: int = 24) -> float:
    """Share of `items` the engine answers right, greedy, one question per conversation."""
    from local_models.engine import Sampling

    right = 0
    for item in items:
        messages = [{"role": "system", "content": QA_SYSTEM}, {"role": "user", "content": item.question}]
        answer = engine.generate(engine.chat_prompt(messages), Sampling(max_tokens=max_tokens))
        right += is_correct(answer.text, item.answers)
    return right / len(items) if items else 0.0


def default_qa() -> list[QAItem]:
    """The built-in QA sample (30 short factual and arithmetic questions)."""
    from local_models.compress_samples import QA_SAMPLE

    return [QAItem(question, answers) for question, answers in QA_SAMPLE]


def load_qa(path: Path, limit: int | None = None) -> list[QAItem]:
    """QA items from a JSON-lines file in nq_open's format: `{"question": ..., "answer": [...]}` per line."""
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            items.append(QAItem(str(row["question"]), tuple(str(a) for a in answers)))
    return items[:limit] if limit else items


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
