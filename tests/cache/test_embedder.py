"""The embedder: unit vectors, batching that keeps order, offline resolution, clear errors."""

from __future__ import annotations

import asyncio
import os
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


SENTENCES = [
    "How do I learn Python quickly?",
    "What is the fastest way to learn Python?",
    "What is the boiling point of water at sea level?",
    "Can you recommend a good science fiction novel?",
    "cachecade",
]


@pytest.fixture(scope="module")
def int8_embedder(model_cache: Path):  # type: ignore[no-untyped-def]
    """The int8 quantisation of the session's fp32 export, through the public loader."""
    return load_embedder("all-MiniLM-L6-v2", "onnx-int8", model_cache)


def test_int8_embedder_gives_unit_vectors_of_the_same_size(int8_embedder, embedder) -> None:  # type: ignore[no-untyped-def]
    vectors = int8_embedder.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert int8_embedder.encode([]).shape == (0, embedder.dim)


def test_int8_embedder_has_its_own_model_id(int8_embedder, embedder) -> None:  # type: ignore[no-untyped-def]
    # Cache entries are indexed per model_id: int8 vectors must never be compared with stored fp32 ones.
    assert int8_embedder.model_id == "all-MiniLM-L6-v2+int8-fused" != embedder.model_id


def test_int8_vectors_stay_close_to_fp32(int8_embedder, embedder) -> None:  # type: ignore[no-untyped-def]
    cosine = (int8_embedder.encode(SENTENCES) * embedder.encode(SENTENCES)).sum(axis=1)
    assert cosine.min() >= 0.9
    assert not np.allclose(cosine, 1.0, atol=1e-4)  # it really is another model, not the fp32 file again


def test_int8_still_ranks_paraphrases_above_unrelated_text(int8_embedder) -> None:  # type: ignore[no-untyped-def]
    question, paraphrase, unrelated, novel, _ = int8_embedder.encode(SENTENCES)
    assert float(question @ paraphrase) > 0.8
    assert float(question @ paraphrase) > float(question @ unrelated) + 0.3
    assert float(question @ paraphrase) > float(question @ novel) + 0.3


def test_int8_file_is_made_once_beside_fp32(int8_embedder, embedder, model_cache: Path) -> None:  # type: ignore[no-untyped-def]
    fp32_file, int8_file = embedder.onnx_path, int8_embedder.onnx_path
    assert int8_file.parent == fp32_file.parent and int8_file.name.endswith(".int8.onnx")
    assert int8_file.stat().st_size < fp32_file.stat().st_size / 3  # int8 weights, a quarter of fp32's
    made = int8_file.stat().st_mtime_ns
    assert load_embedder("all-MiniLM-L6-v2", "onnx-int8", model_cache).onnx_path == int8_file  # type: ignore[attr-defined]
    assert int8_file.stat().st_mtime_ns == made
    assert not list(fp32_file.parent.glob("*.tmp"))


def test_int8_quantisation_that_strays_from_fp32_is_refused(
    embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from cache import onnx_embedder

    monkeypatch.setattr(onnx_embedder, "INT8_MIN_AGREEMENT", 1.01)  # no quantisation reaches it
    target = tmp_path / "refused.int8.onnx"
    model_dir = resolve_embedder_path("all-MiniLM-L6-v2")
    with pytest.raises(EmbedderError, match="strays from fp32"):
        onnx_embedder.quantize_int8(embedder.onnx_path, model_dir, target)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_export_is_fused_and_int8_quantises_the_fused_attention(int8_embedder, embedder) -> None:  # type: ignore[no-untyped-def]
    import onnx

    fp32_ops = {node.op_type for node in onnx.load(str(embedder.onnx_path), load_external_data=False).graph.node}
    int8_ops = {node.op_type for node in onnx.load(str(int8_embedder.onnx_path)).graph.node}
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization"} <= fp32_ops
    assert "QAttention" in int8_ops and "Attention" not in int8_ops
    # each backend's faster setting when unset
    assert embedder.threads == min(2, os.cpu_count() or 1) and int8_embedder.threads == 1
