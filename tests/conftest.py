"""Shared fixtures. Tests are hermetic: temporary dirs, free ports, no reliance on the caller's environment."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# The caller's CACHECADE_* variables must not leak into tests that build Settings().
for _name in [n for n in os.environ if n.startswith("CACHECADE_")]:
    del os.environ[_name]


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's ONNX export of the embedder lives (exported once per test session)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def embedder(model_cache: Path):  # type: ignore[no-untyped-def]
    """The real packaged embedder (all-MiniLM-L6-v2 on ONNX Runtime), loaded once."""
    from cache.embedder import load_embedder

    return load_embedder("all-MiniLM-L6-v2", "onnx", model_cache)
