"""Local models in child processes (local_models.isolation), on the real packaged SmolLM2: the same answers as in
process, and a child that dies (killed with SIGSEGV, as a llama.cpp crash ends it) fails one request, not the
caller, which gets a new child next time and turns the model off after repeated crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from local_models import isolation
from local_models.engine import LlamaEngine, Sampling
from local_models.errors import Crashed, PromptTooLong, TierOff
from local_models.isolation import ChildProcessWorker
from local_models.registry import default_local_models, smollm2_gguf

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def worker() -> Iterator[ChildProcessWorker]:
    w = ChildProcessWorker("smollm2", default_local_models()["smollm2"], smollm2_gguf())
    w.start()
    yield w
    w.close()


async def kill_while_generating(w: ChildProcessWorker, sig: int = signal.SIGSEGV) -> BaseException:
    """Start a long answer, kill the child during it, and return what the caller got."""
    task = asyncio.create_task(w.generate(w.prompt("chat", {"messages": STORY}), [Sampling(max_tokens=400)]))
    deadline = time.monotonic() + 60  # after a crash the next child loads its model first (slow on a slow CPU)
    while w.pid is None and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.8)  # into the answer (400 tokens take seconds)
    assert w.pid is not None and not task.done()
    os.kill(w.pid, sig)
    with pytest.raises(Crashed) as info:
        await task
    return info.value


async def test_answers_as_the_engine_does_in_process(worker: ChildProcessWorker, engines: dict[str, Any]) -> None:
    local: LlamaEngine = engines["smollm2"]
    prompt, sampling = worker.prompt("chat", {"messages": ASK}), Sampling(max_tokens=16)
    (theirs,) = await worker.generate(prompt, [sampling])
    ours = local.generate(local.chat_prompt(ASK), sampling)
    assert (theirs.text, theirs.token_logprobs) == (ours.text, ours.token_logprobs)
    assert worker.load == 0


async def test_a_crash_fails_one_request_and_the_next_gets_a_new_child(worker: ChildProcessWorker) -> None:
    first_pid = worker.pid
    error = await kill_while_generating(worker)
    assert error.reason == "crashed" and "died with SIGSEGV while answering" in str(error)
    (answer,) = await worker.generate(worker.prompt("chat", {"messages": ASK}), [Sampling(max_tokens=8)])
    assert answer.text and worker.pid not in (None, first_pid) and worker.off_reason is None


async def test_repeated_crashes_turn_the_model_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "MAX_CRASHES", 2)
    w = ChildProcessWorker("smollm2", default_local_models()["smollm2"], smollm2_gguf())
    try:
        w.start()
        for _ in range(2):
            await kill_while_generating(w, signal.SIGABRT)
        assert w.off_reason is not None and "2 times" in w.off_reason
        with pytest.raises(TierOff):
            await w.generate(w.prompt("chat", {"messages": ASK}), [Sampling(max_tokens=8)])
    finally:
        w.close()


async def test_cancelling_stops_the_child_and_it_keeps_serving(worker: ChildProcessWorker) -> None:
    task = asyncio.create_task(worker.generate(worker.prompt("chat", {"messages": STORY}), [Sampling(400)]))
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pid = worker.pid
    (answer,) = await worker.generate(worker.prompt("chat", {"messages": ASK}), [Sampling(max_tokens=8)])
    assert answer.text and worker.pid == pid


async def test_samples_stop_when_enough_and_errors_come_back(worker: ChildProcessWorker) -> None:
    prompt = worker.prompt("chat", {"messages": ASK})
    samplings = [Sampling(max_tokens=8, temperature=0.7, seed=s) for s in range(5)]
    answers = await worker.generate(prompt, samplings, lambda out: len(out) == 2)
    assert len(answers) == 2
    too_long = worker.prompt("chat", {"messages": [{"role": "user", "content": "word " * 3000}]})
    with pytest.raises(PromptTooLong):
        await worker.generate(too_long, [Sampling(max_tokens=8)])
    (answer,) = await worker.generate(prompt, [Sampling(max_tokens=8)])  # the same child goes on
    assert answer.text
