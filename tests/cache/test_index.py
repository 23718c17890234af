"""The partitioned FAISS vector index: flat search, HNSW switch, tombstones, partition isolation."""

from __future__ import annotations

import numpy as np
import pytest

from cache.index import VectorIndex

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def axis(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def brute_force(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    scores = vectors @ query
    return [int(ids[i]) for i in np.argsort(-scores)[:k]]


def test_add_search_remove() -> None:
    index = VectorIndex(DIM)
    index.add("p", 1, axis(0))
    index.add("p", 2, axis(1))
    index.add("p", 3, (axis(0) + axis(1)) / np.sqrt(2))
    assert len(index) == 3
    assert 2 in index and 4 not in index
    hits = index.search("p", axis(0), k=3)
    assert [vid for vid, _ in hits] == [1, 3, 2]
    assert hits[0][1] == pytest.approx(1.0, abs=1e-6)
    assert hits[1][1] == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert hits[2][1] == pytest.approx(0.0, abs=1e-6)
    assert index.search("p", axis(0), k=1) == [(1, pytest.approx(1.0, abs=1e-6))]
    assert index.remove([1, 99]) == 1
    assert 1 not in index and len(index) == 2
    assert [vid for vid, _ in index.search("p", axis(0), k=3)] == [3, 2]


def test_search_unknown_partition_is_empty() -> None:
    index = VectorIndex(DIM)
    assert index.search("nowhere", axis(0)) == []


def test_partition_isolation() -> None:
    index = VectorIndex(DIM)
    index.add("A", 1, axis(0))
    index.add("B", 2, axis(5))
    assert index.partitions() == 2
    assert [vid for vid, _ in index.search("B", axis(0), k=4)] == [2]
    assert [vid for vid, _ in index.search("A", axis(0), k=4)] == [1]
    assert index.search("C", axis(0)) == []


def test_identical_vectors_in_two_partitions_stay_apart() -> None:
    index = VectorIndex(DIM)
    index.add("A", 1, axis(3))
    index.add("B", 2, axis(3))
    assert index.search("A", axis(3), k=10) == [(1, pytest.approx(1.0, abs=1e-6))]
    assert index.search("B", axis(3), k=10) == [(2, pytest.approx(1.0, abs=1e-6))]


def test_replace_vid_flat() -> None:
    index = VectorIndex(DIM)
    index.add("p", 1, axis(0))
    index.add("p", 2, axis(1))
    index.add("p", 1, axis(2))  # replace
    assert len(index) == 2
    hits = index.search("p", axis(2), k=4)
    assert hits[0] == (1, pytest.approx(1.0, abs=1e-6))
    assert [vid for vid, _ in hits] == [1, 2]  # the old vector of 1 is gone, no duplicate
    assert index.search("p", axis(0), k=4)[0][1] == pytest.approx(0.0, abs=1e-6)


def test_replace_vid_moves_partition() -> None:
    index = VectorIndex(DIM)
    index.add("A", 1, axis(0))
    index.add("B", 1, axis(0))
    assert len(index) == 1
    assert index.search("A", axis(0)) == []
    assert index.partitions() == 1
    assert [vid for vid, _ in index.search("B", axis(0))] == [1]


def _hnsw_index(n: int = 120, seed: int = 0) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    index = VectorIndex(DIM, hnsw_threshold=50)
    index.add_many("p", ids[:40], vectors[:40])
    assert not index._partitions["p"].hnsw
    for vid, vec in zip(ids[40:], vectors[40:], strict=True):
        index.add("p", int(vid), vec)
    assert index._partitions["p"].hnsw
    return index, ids, vectors


def test_hnsw_switch_finds_exact_neighbours() -> None:
    index, ids, vectors = _hnsw_index()
    assert len(index) == len(ids)
    for vid, vec in zip(ids, vectors, strict=True):
        hits = index.search("p", vec, k=5)
        assert hits[0] == (int(vid), pytest.approx(1.0, abs=1e-5))
        assert [h for h, _ in hits] == brute_force(vectors, ids, vec, 5)


def test_hnsw_removal_uses_tombstones() -> None:
    index, ids, vectors = _hnsw_index()
    removed = [int(v) for v in ids[::3]]
    assert index.remove(removed) == len(removed)
    assert len(index) == len(ids) - len(removed)
    part = index._partitions["p"]
    assert part.tombstones == set(removed)
    keep = np.array([int(v) not in removed for v in ids])
    for vec in vectors:
        hits = [h for h, _ in index.search("p", vec, k=4)]
        assert len(hits) == 4
        assert not set(hits) & set(removed)
        assert hits == brute_force(vectors[keep], ids[keep], vec, 4)


def test_hnsw_remove_everything_drops_partition() -> None:
    index, ids, _ = _hnsw_index(60)
    index.remove([int(v) for v in ids])
    assert index.partitions() == 0
    assert len(index) == 0
    assert index.search("p", axis(0)) == []


def test_hnsw_tombstone_compaction() -> None:
    rng = np.random.default_rng(1)
    n = 1300
    vectors, ids = unit(rng, n), np.arange(1, n + 1, dtype=np.int64)
    index = VectorIndex(DIM, hnsw_threshold=50)
    index.add_many("p", ids, vectors)
    removed = [int(v) for v in ids[:1001]]  # more than max(1000, n // 5) tombstones triggers a rebuild
    index.remove(removed)
    part = index._partitions["p"]
    assert part.hnsw and part.tombstones == set()
    assert part.index.ntotal == n - 1001 == len(index)
    for vid, vec in zip(ids[1001:], vectors[1001:], strict=True):
        assert index.search("p", vec, k=1) == [(int(vid), pytest.approx(1.0, abs=1e-5))]
    assert all(h not in removed for h, _ in index.search("p", vectors[0], k=20))


def test_replace_vid_hnsw() -> None:
    index, ids, vectors = _hnsw_index()
    target = int(ids[0])
    new = -vectors[0]
    index.add("p", target, new)
    assert len(index) == len(ids)
    assert index.search("p", new, k=1) == [(target, pytest.approx(1.0, abs=1e-5))]


def test_empty_partitions_dropped_and_clear() -> None:
    index = VectorIndex(DIM)
    index.add("A", 1, axis(0))
    index.add("A", 2, axis(1))
    index.add("B", 3, axis(2))
    assert index.partitions() == 2
    index.remove([1])
    assert index.partitions() == 2
    index.remove([2])
    assert index.partitions() == 1
    assert index.search("A", axis(1)) == []
    index.clear()
    assert index.partitions() == 0 and len(index) == 0
    assert index.search("B", axis(2)) == []
