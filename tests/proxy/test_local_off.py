"""A local model whose start-up self-check crashes (a llama.cpp build this CPU cannot run) is off: the proxy starts,
says so in /readyz, /admin/stats, /admin/cascade and /metrics, and its tier escalates with the reason.

The app loads the real packaged models here (no preloaded engines), with the self-check's child swapped for one
that dies with SIGILL on the models named in CRASHING and passes on the others."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from local_models import selfcheck
from proxy.app import create_app
from proxy.config import Settings
from tests.proxy.conftest import ADMIN, FakeUpstream

SIGILL = "llama.cpp died with SIGILL (illegal instruction) in a test generation"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@asynccontextmanager
async def serving(tmp_path: Path, embedder: Any, model_cache: Path, crashing: Iterable[str],
                  upstream: FakeUpstream | None) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:  # fmt: skip
    """The app with models loaded from their files, behind a self-check that crashes on some of them."""
    files = {"smollm2": "SmolLM2", "gemma3": "gemma"}
    dying = [files[name] for name in crashing]
    code = ("import os, signal, sys\n"
            f"if any(part in sys.argv[1] for part in {dying!r}): os.kill(os.getpid(), signal.SIGILL)\n"
            "print('{\"system_info\": \"test\"}')")  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selfcheck, "CHILD", (sys.executable, "-c", code))
        settings = Settings(data_dir=tmp_path / "data", model_cache_dir=model_cache, admin_token=ADMIN,
                            upstream_base_url="http://upstream.test/v1" if upstream else None)  # fmt: skip
        transport = httpx.MockTransport(upstream) if upstream else None
        app = create_app(settings, embedder=embedder, upstream_transport=transport)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        async with app.router.lifespan_context(app), client:
            yield client, app


def auto(question: str) -> dict[str, Any]:
    return {"model": "cachecade/auto", "max_tokens": 8, "messages": [{"role": "user", "content": question}]}


async def test_a_crashing_model_is_off_and_reported_everywhere(
    tmp_path: Path, embedder: Any, model_cache: Path
) -> None:
    upstream = FakeUpstream()
    async with serving(tmp_path, embedder, model_cache, ["smollm2"], upstream) as (client, _):
        ready = (await client.get("/readyz")).json()
        assert ready["status"] == "ready"
        assert ready["local_models"] == ["gemma3"] and ready["local_models_off"] == {"smollm2": SIGILL}
        stats = (await client.get("/admin/stats", headers=AUTH)).json()
        assert stats["cascade"]["local_models_off"] == {"smollm2": SIGILL}
        assert stats["cascade"]["local_models"] == ["gemma3"]
        metrics = (await client.get("/metrics")).text
        assert 'cachecade_local_model_up{tier="smollm2"} 0.0' in metrics
        assert 'cachecade_local_model_up{tier="gemma3"} 1.0' in metrics

        r = await client.post("/v1/chat/completions", json=auto("Which ocean is the largest?"))
        assert r.status_code == 200, r.text
        assert r.headers["x-escalated"].split(",")[0] == "smollm2:off"
        assert "smollm2" not in r.headers["x-served-by"]

        # A route may still name the model that is off (it is configured): its tier just escalates.
        put = await client.put(
            "/admin/cascade", headers=AUTH, json={"routes": {"cachecade/auto": ["smollm2", "upstream"]}}
        )
        assert put.status_code == 200, put.text
        r = await client.post("/v1/chat/completions", json=auto("Which planet is the largest?"))
        assert r.headers["x-escalated"] == "smollm2:off" and r.headers["x-served-by"] == "upstream:cachecade/auto"


async def test_all_models_off_without_upstream_is_a_clear_503(tmp_path: Path, embedder: Any, model_cache: Path) -> None:
    async with serving(tmp_path, embedder, model_cache, ["smollm2", "gemma3"], None) as (client, _):
        assert (await client.get("/readyz")).json()["local_models"] == []
        r = await client.post("/v1/chat/completions", json=auto("Which ocean is the largest?"))
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "local_models_unavailable"
        assert "smollm2:off, gemma3:off" in error["message"] and SIGILL in error["message"]
        assert (await client.get("/healthz")).status_code == 200


async def test_a_crash_while_answering_escalates_and_the_proxy_lives_on(
    tmp_path: Path, embedder: Any, model_cache: Path
) -> None:
    """SmolLM2's child process is killed (SIGSEGV, as a llama.cpp crash ends it) in the middle of an answer: the
    request escalates to the next tier, the proxy keeps serving, and the next request gets a new child."""
    upstream = FakeUpstream()
    async with serving(tmp_path, embedder, model_cache, [], upstream) as (client, app):
        worker = app.state.services.cascade.workers["smollm2"]
        first_pid = worker.pid
        story = {**auto("Write a long story about a lighthouse keeper and a storm."), "max_tokens": 400}
        request = asyncio.create_task(client.post("/v1/chat/completions", json=story))
        await asyncio.sleep(1.0)
        assert not request.done()
        os.kill(first_pid, signal.SIGSEGV)
        r = await request
        assert r.status_code == 200, r.text
        assert r.headers["x-escalated"].split(",")[0] == "smollm2:crashed"
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).json()["local_models"] == ["gemma3", "smollm2"]
        stats = (await client.get("/admin/stats", headers=AUTH)).json()
        assert stats["cascade"]["escalations"]["smollm2:crashed"] == 1
        r = await client.post("/v1/chat/completions", json=auto("What is the capital of France?"))
        assert r.status_code == 200 and "smollm2:crashed" not in r.headers.get("x-escalated", "")
        assert worker.pid not in (None, first_pid)
