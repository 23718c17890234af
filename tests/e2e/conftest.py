"""Real processes: llama-cpp-python's OpenAI-compatible server on the packaged SmolLM2 GGUF as the upstream, and
cachecade under uvicorn (`cachecade serve`) on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from local_models.registry import smollm2_gguf
from tests.conftest import free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not up after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def llama_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama_cpp.server on SmolLM2-135M-Instruct: a real OpenAI-compatible upstream. Yields its /v1 URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias", "smollm2",
           "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/v1/models", process, log)
        yield f"http://127.0.0.1:{port}/v1"
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
