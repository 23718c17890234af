"""A GGUF model in llama.cpp (through llama-cpp-python), generating with per-token log-probabilities.

llama-cpp-python only returns logprobs when the model is loaded with `logits_all=True`, which computes the
output layer for every prompt token and made generation about 5x slower here. The sampled token's logprob only
needs the last position's logits, which llama.cpp computes anyway: they are read straight from the context
after each step, so the signal costs one log-softmax per token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from local_models.errors import Cancelled, LoadFailed, PromptTooLong
from local_models.prompts import ChatTemplate, FewShot, Prompt
from local_models.registry import LocalModelConfig

log = logging.getLogger("cachecade.local")


@dataclass(frozen=True)
class Sampling:
    """How to decode: temperature 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclass(frozen=True)
class Generation:
    """One decoded answer with what the confidence gate reads."""

    text: str
    token_logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    seconds: float
    tokens: list[int] = field(default_factory=list, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_logprobs)


def _logprob(logits: np.ndarray, token: int) -> float:
    top = float(logits.max())
    return float(logits[token]) - top - math.log(float(np.exp(logits - top).sum()))


def prompt_batches(n: int) -> list[tuple[int, int]]:
    """The (start, end) batches a prompt of n tokens is evaluated in: they end at fixed positions (8, 16, 24, 32,
    48, 64, 96, 128, 192, ...: half the power of two below them apart, so a shared head is kept to within
    a third of its length and a new prompt takes few batches), and the last one holds the last token."""
    ends, end = [], 8
    while end < n:
        ends.append(end)
        end += max(8, 2 ** (end.bit_length() - 2))
    starts = [0, *ends]
    return list(zip(starts, [*ends, n], strict=True))


class LlamaEngine:
    """One loaded model. Not thread-safe: ModelWorker calls it from a single thread."""

    def __init__(self, name: str, config: LocalModelConfig, path: Path, vocab_only: bool = False) -> None:
        """Load the model; `vocab_only` loads its vocabulary and metadata alone (prompts and token counts, no
        generation: what the proxy keeps when the weights live in a child process)."""
        from llama_cpp import Llama

        self.name = name
        self.config = config
        self.path = path
        try:
            self.llm = Llama(model_path=str(path), n_ctx=config.n_ctx, n_threads=config.threads,
                             n_threads_batch=config.threads, n_batch=512, logits_all=False, vocab_only=vocab_only,
                             verbose=False)  # fmt: skip
        except (ValueError, RuntimeError, OSError) as exc:
            raise LoadFailed(f"local model {name}: cannot load {path}: {exc}") from exc
        self.n_vocab = self.llm.n_vocab()
        self.formatter = self._formatter()
        # Prompt tokens in the KV cache that _evaluate_prompt may keep. Code that uses .llm directly calls
        # llm.reset() before and after, so that this stays true.
        self._evaluated: list[int] = []

    @classmethod
    def load(cls, name: str, config: LocalModelConfig, cache_dir: Path | None = None) -> LlamaEngine:
        """Find the model's file and load it."""
        return cls(name, config, config.gguf(cache_dir))

    def _formatter(self) -> ChatTemplate | FewShot:
        if self.config.prompt == "few-shot":
            return FewShot()
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise LoadFailed(f"local model {self.name}: {self.path.name} has no chat template; use prompt few-shot")
        model = self.llm._model
        eos, bos = model.token_eos(), model.token_bos()
        text = model.token_get_text
        return ChatTemplate(template, text(bos) if bos != -1 else "", text(eos) if eos != -1 else "")

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        """The prompt for chat messages in this model's format (Unsupported for tools, images, ...)."""
        return self.formatter.chat(messages)

    def text_prompt(self, prompt: str) -> Prompt:
        """The prompt for a legacy completion."""
        return self.formatter.text(prompt)

    def count_tokens(self, text: str) -> int:
        """Tokens of a text in this model's tokenizer."""
        return len(self.llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=True))

    def generate(self, prompt: Prompt, sampling: Sampling, cancelled: Callable[[], bool] = lambda: False) -> Generation:
        """Decode one answer; stops at an end-of-generation token, a stop string or max_tokens."""
        started = time.perf_counter()
        tokens = self.llm.tokenize(prompt.text.encode("utf-8", "replace"), add_bos=not prompt.has_bos, special=True)
        room = self.config.n_ctx - len(tokens)
        if room <= 0:
            raise PromptTooLong(f"{len(tokens)} prompt tokens fill {self.name}'s context of {self.config.n_ctx}")
        limit = min(sampling.max_tokens, room)
        stops = tuple(s for s in (*prompt.stop, *sampling.stop) if s)
        out, logprobs, text, finish = self._decode(tokens, sampling, limit, stops, cancelled)
        return Generation(text, logprobs, finish, len(tokens), time.perf_counter() - started, out)

    def _decode(
        self, prompt: list[int], sampling: Sampling, limit: int, stops: tuple[str, ...], cancelled: Callable[[], bool]
    ) -> tuple[list[int], list[float], str, Literal["stop", "length"]]:
        import llama_cpp

        llm = self.llm
        vocab, ctx = llm._model.vocab, llm._ctx.ctx
        out: list[int] = []
        logprobs: list[float] = []
        llm.set_seed(sampling.seed)
        self._evaluate_prompt(prompt)
        generator = llm.generate([], temp=sampling.temperature, top_p=sampling.top_p, top_k=0, min_p=0.0,
                                 repeat_penalty=1.0, reset=False)  # fmt: skip
        try:
            for token in generator:
                if cancelled():
                    raise Cancelled(f"{self.name}: caller went away")
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    return out, logprobs, self._text(out), "stop"
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
                out.append(token)
                logprobs.append(_logprob(logits, token))
                text = self._text(out)
                cut = _stop_at(text, stops)
                if cut is not None:
                    return out, logprobs, cut, "stop"
                if len(out) >= limit:
                    return out, logprobs, text, "length"
        finally:
            generator.close()
        return out, logprobs, self._text(out), "length"

    def _evaluate_prompt(self, prompt: list[int]) -> None:
        """Evaluate the prompt in the batches `prompt_batches` gives, keeping those that the previous prompt
        evaluated and this one shares (a system prompt, the few-shot examples).

        llama-cpp-python's own prefix reuse evaluates whatever follows the shared prefix as one batch, so the same
        prompt went through other batch sizes, kernels and roundings depending on the request before it, and its
        greedy answer changed with history (on the portable AVX2 build: "17th" after one question, "18th" after
        another). Here every token of a prompt is evaluated in the same batch whatever came before."""
        llm, batches = self.llm, prompt_batches(len(prompt))
        done = self._evaluated
        kept = 0
        if done and llm.n_tokens >= len(done) and llm.input_ids[: len(done)].tolist() == done:
            for start, end in batches[:-1]:  # the last batch holds the last token, whose logits are needed
                if end > len(done) or prompt[start:end] != done[start:end]:
                    break
                kept = end
        llm.n_tokens = kept  # eval drops the KV cache past this point
        for start, end in batches:
            if start >= kept:
                llm.eval(prompt[start:end])
        self._evaluated = prompt[: batches[-1][0]]

    def _text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "ignore")


def _stop_at(text: str, stops: tuple[str, ...]) -> str | None:
    """The text before the first stop string, or None when none occurs."""
    found = [text.index(s) for s in stops if s in text]
    return text[: min(found)] if found else None
