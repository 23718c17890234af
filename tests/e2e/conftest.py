"""Real processes: llama-cpp-python's OpenAI-compatible server on the packaged SmolLM2 GGUF as the upstream, and
cachecade under uvicorn (`cachecade serve`) on free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from local_models.processes import free_port, start_llama_server, stop, wait_until_up
from local_models.registry import smollm2_gguf

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def llama_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama_cpp.server on SmolLM2-135M-Instruct: a real OpenAI-compatible upstream. Yields its /v1 URL."""
    log = tmp_path_factory.mktemp("llama") / "server.log"
    process, url = start_llama_server(smollm2_gguf(), "smollm2", log)
    try:
        yield url
    finally:
        stop(process)


@dataclass
class Proxy:
    """A running `cachecade serve`."""

    url: str
    process: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


@pytest.fixture(scope="session")
def start_proxy(model_cache: Path, embedder: object) -> Iterator[Callable[..., Proxy]]:
    """Factory: start `cachecade serve` with CACHECADE_* settings; every one started is stopped at the end.
    (Depends on `embedder` so the ONNX export in `model_cache` exists before a server starts.)"""
    started: list[Proxy] = []

    def start(data_dir: Path, **settings: str) -> Proxy:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CACHECADE_")}
        env |= {"CACHECADE_DATA_DIR": str(data_dir), "CACHECADE_MODEL_CACHE_DIR": str(model_cache),
                "HF_HUB_OFFLINE": "1", **{f"CACHECADE_{k.upper()}": v for k, v in settings.items()}}  # fmt: skip
        log = data_dir.parent / f"cachecade-{port}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            cmd = [str(BIN / "cachecade"), "serve", "--host", "127.0.0.1", "--port", str(port)]
            process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        proxy = Proxy(f"http://127.0.0.1:{port}", process, log)
        started.append(proxy)
        wait_until_up(f"{proxy.url}/readyz", process, log)
        return proxy

    yield start
    for proxy in started:
        stop(proxy.process)


@pytest.fixture
def start_test_proxy(start_proxy: Callable[..., Proxy]) -> Iterator[Callable[..., Proxy]]:
    """start_proxy for one test: what it starts is stopped when the test ends, not with the session (idle servers
    would hold their models, and replicas of a Redis that is gone would keep retrying it)."""
    mine: list[Proxy] = []

    def start(data_dir: Path, **settings: str) -> Proxy:
        proxy = start_proxy(data_dir, **settings)
        mine.append(proxy)
        return proxy

    yield start
    for proxy in mine:
        stop(proxy.process)
