"""Shared fixtures. Tests are hermetic: temporary dirs, free ports, no reliance on the caller's environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from local_models.processes import ServerFailed, free_port, stop
from tests.redis_server import start_redis

__all__ = ["free_port", "served"]
T = TypeVar("T")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The caller's CACHECADE_* variables must not leak into tests that build Settings().
for _name in [n for n in os.environ if n.startswith("CACHECADE_")]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's ONNX export of the embedder lives (exported once per test session)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def embedder(model_cache: Path):  # type: ignore[no-untyped-def]
    """The real packaged embedder (all-MiniLM-L6-v2 on ONNX Runtime), loaded once."""
    from cache.embedder import load_embedder

    return load_embedder("all-MiniLM-L6-v2", "onnx", model_cache)


@pytest.fixture(scope="session")
def engines(model_cache: Path):  # type: ignore[no-untyped-def]
    """The packaged local models (SmolLM2 with its chat template, Gemma 3 270M few-shot), loaded once."""
    from local_models.engine import LlamaEngine
    from local_models.registry import default_local_models

    return {name: LlamaEngine.load(name, config, model_cache) for name, config in default_local_models().items()}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this test session's own, on a free port; yields `redis://127.0.0.1:<port>/0`. Fails (never
    skips) when redis-server cannot start: `make test` installs it."""
    with served(lambda: start_redis(tmp_path_factory.mktemp("redis") / "redis.log"), stop) as url:
        yield url


@contextmanager
def served(start: Callable[[], tuple[T, str]], stop_server: Callable[[T], None]) -> Iterator[str]:
    """The URL of the server `start` brings up, stopped on the way out. A server that cannot start fails the test,
    never skips it: `make test` installs what the tests need."""
    try:
        server, url = start()
    except ServerFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        stop_server(server)
