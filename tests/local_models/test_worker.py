"""The worker: inference off the event loop, a bounded queue, cancellation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from local_models.engine import Sampling
from local_models.errors import Saturated
from local_models.worker import ModelWorker

LONG = Sampling(max_tokens=64)


async def test_saturated_worker_refuses_instead_of_queueing(engines: dict[str, Any]) -> None:
    worker = ModelWorker(engines["smollm2"], max_queue=1)
    prompt = worker.prompt("chat", {"messages": [{"role": "user", "content": "Write a story about a cat."}]})
    first = asyncio.ensure_future(worker.generate(prompt, [LONG]))
    await asyncio.sleep(0)
    assert worker.load == 1
    with pytest.raises(Saturated):
        await worker.generate(prompt, [LONG])
    (answer,) = await first
    assert answer.completion_tokens > 0 and worker.load == 0
    worker.close()


async def test_cancelled_request_stops_and_frees_its_place(engines: dict[str, Any]) -> None:
    worker = ModelWorker(engines["smollm2"], max_queue=1)
    prompt = worker.prompt("chat", {"messages": [{"role": "user", "content": "Write a story about a dog."}]})
    task = asyncio.ensure_future(worker.generate(prompt, [Sampling(max_tokens=400)] * 3))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(50):  # the thread stops at its next token
        if worker.load == 0:
            break
        await asyncio.sleep(0.05)
    assert worker.load == 0
    (answer,) = await worker.generate(prompt, [Sampling(max_tokens=2)])
    assert answer.completion_tokens == 2
    worker.close()


async def test_event_loop_stays_free_while_generating(engines: dict[str, Any]) -> None:
    worker = ModelWorker(engines["smollm2"], max_queue=2)
    prompt = worker.prompt("chat", {"messages": [{"role": "user", "content": "Write a story."}]})
    task = asyncio.ensure_future(worker.generate(prompt, [Sampling(max_tokens=48)]))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 5  # the loop kept running during generation
    worker.close()
