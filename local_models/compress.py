"""Re-quantise a GGUF model with llama.cpp and measure what it costs: file size, decode speed, perplexity on a
fixed text and accuracy on a small fixed QA sample, each file on the same inputs.

The packaged files are already quantised (SmolLM2 Q4_1, Gemma 3 Q4_K_M), so every output is derived from those
weights: a "Q8_0" made from Q4_1 is bigger but cannot be better than its Q4_1 source. Only an F16/BF16 source
gives each type its real quality.
"""

from __future__ import annotations

import ctypes
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from local_models.errors import LocalModelError

if TYPE_CHECKING:
    from llama_cpp import Llama


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
