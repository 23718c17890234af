"""Runs one engine off the event loop, on its own thread, behind a bounded queue.

llama.cpp contexts are not thread-safe and two generations on 2 cores only slow each other, so each model has
one thread. A request that finds `max_queue` requests already in the model is refused (Saturated) so the
cascade can escalate instead of queueing without limit. A caller that goes away stops its generation at the
next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from local_models.engine import Generation, LlamaEngine, Sampling
from local_models.errors import Saturated
from local_models.prompts import Prompt

T = TypeVar("T")
Enough = Callable[[list[Generation]], bool] | None  # stops a job's samples early once it says so


class ModelWorker:
    """One model, one thread, a bounded queue."""

    def __init__(self, engine: LlamaEngine, max_queue: int | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue or engine.config.max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llm-{engine.name}")
        self._lock = threading.Lock()
        self._in_model = 0  # running + waiting, counted until the thread is done with each
        self.off_reason: str | None = None  # set when the model must not run any more (isolation: crashes)

    @property
    def name(self) -> str:
        return self.engine.name

    @property
    def load(self) -> int:
        """Requests in this model now (running + waiting)."""
        return self._in_model

    def prompt(self, kind: str, body: Mapping[str, Any]) -> Prompt:
        """The prompt for a request body (cheap; runs on the caller's thread)."""
        if kind == "chat":
            messages: Sequence[Mapping[str, Any]] = body.get("messages") or []
            return self.engine.chat_prompt(messages)
        return self.engine.text_prompt(str(body.get("prompt") or ""))

    async def generate(self, prompt: Prompt, samplings: Sequence[Sampling],
                       enough: Callable[[list[Generation]], bool] | None = None) -> list[Generation]:  # fmt: skip
        """Decode one generation per Sampling, in order, as one queued job; `enough` may stop early."""
        cancel = threading.Event()

        def job() -> list[Generation]:
            return self._run(prompt, samplings, enough, cancel)

        with self._lock:
            if self._in_model >= self.max_queue:
                raise Saturated(f"{self.name}: {self._in_model} requests already queued (max_queue {self.max_queue})")
            self._in_model += 1
        future = self._executor.submit(job)
        future.add_done_callback(self._release)  # also runs when the job is cancelled before it started
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next token and releases its place in the queue
            raise

    def _run(self, prompt: Prompt, samplings: Sequence[Sampling], enough: Enough, cancel: threading.Event
             ) -> list[Generation]:  # fmt: skip
        """The job, on the model's thread: one generation per Sampling until `enough`."""
        out: list[Generation] = []
        for sampling in samplings:
            out.append(self.engine.generate(prompt, sampling, cancel.is_set))
            if enough is not None and enough(out):
                break
        return out

    def _release(self, _: object) -> None:
        with self._lock:
            self._in_model -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
