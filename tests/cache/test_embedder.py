"""The embedder: unit vectors, batching that keeps order, offline resolution, clear errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from cache.embedder import AsyncEmbedder, load_embedder, resolve_embedder_path
from cache.errors import EmbedderError


def test_vectors_are_unit_length_and_deterministic(embedder) -> None:  # type: ignore[no-untyped-def]
    vectors = embedder.encode(["hello world", "hello world", "something else entirely"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[1]) and float(vectors[0] @ vectors[2]) < 0.5


def test_batches_keep_input_order(embedder) -> None:  # type: ignore[no-untyped-def]
    texts = [("word " * (i % 17 + 1)) + str(i) for i in range(75)]  # more than one batch, mixed lengths
    together = embedder.encode(texts)
    alone = np.stack([embedder.encode([t])[0] for t in texts[::10]])
    assert np.allclose(together[::10], alone, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_long_text_is_truncated_not_rejected(embedder) -> None:  # type: ignore[no-untyped-def]
    assert embedder.encode(["lorem ipsum " * 2000]).shape == (1, 384)
    assert embedder.count_tokens(["hello world"]) == [4]  # [CLS] hello world [SEP]


async def test_async_embedder_batches_concurrent_requests(embedder) -> None:  # type: ignore[no-untyped-def]
    async_embedder = AsyncEmbedder(embedder, max_batch=8)
    texts = [f"question number {i}" for i in range(20)]
    vectors = await asyncio.gather(*(async_embedder.embed(t) for t in texts))
    assert np.allclose(np.stack(vectors), embedder.encode(texts), atol=1e-5)
    async_embedder.close()


def test_packaged_name_resolves_offline() -> None:
    assert (resolve_embedder_path("all-MiniLM-L6-v2") / "tokenizer.json").is_file()
    assert resolve_embedder_path("sentence-transformers/all-MiniLM-L6-v2").name == "model"


def test_unknown_embedder_and_backend_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(EmbedderError, match="neither a packaged name"):
        resolve_embedder_path("some-hub/model-name")
    with pytest.raises(EmbedderError, match="unknown embedder backend"):
        load_embedder("all-MiniLM-L6-v2", "tensorrt", tmp_path)


def test_texts_longer_than_the_model_reads_get_no_vector(embedder) -> None:  # type: ignore[no-untyped-def]
    long_text = "word " * (embedder.max_tokens + 10)
    short, long = embedder.encode_fitting(["hello world", long_text])
    assert long is None and np.allclose(short, embedder.encode(["hello world"])[0], atol=1e-6)
    assert embedder.count_tokens([long_text])[0] > embedder.max_tokens
