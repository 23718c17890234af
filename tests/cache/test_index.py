"""The partitioned FAISS vector index: flat search, IVF switch built off the loop, partition isolation."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cache.index import VectorIndex, lists_for

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


def _ivf_index(n: int = 120, seed: int = 0, hold: threading.Event | None = None
               ) -> tuple[VectorIndex, np.ndarray, np.ndarray]:  # fmt: skip
    """A partition past the IVF threshold, its build started; with `hold`, the build waits on the worker thread
    until the event is set (a build of 120 vectors can otherwise finish before the next line looks)."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n)
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    index = VectorIndex(DIM, ivf_threshold=50)
    if hold is not None:
        index._worker = ThreadPoolExecutor(max_workers=1)
        index._worker.submit(hold.wait, 30)  # the build queues behind this
    index.add_many("p", ids[:50], vectors[:50])
    assert index.kind("p") == "flat" and index.building() == 0
    index.add_many("p", ids[50:], vectors[50:])
    return index, ids, vectors


async def test_ivf_switch_finds_exact_neighbours() -> None:
    hold = threading.Event()
    index, ids, vectors = _ivf_index(hold=hold)
    assert index.building() == 1 and index.kind("p") == "flat"  # built off the loop; flat serves meanwhile
    assert [vid for vid, _ in index.search("p", vectors[3], k=5)] == brute_force(vectors, ids, vectors[3], 5)
    hold.set()
    await index.settle()
    assert index.building() == 0 and index.kind("p") == f"ivf{lists_for(120)}"
    for i in range(0, 120, 17):  # 8 cells, all probed: exact
        hits = index.search("p", vectors[i], k=5)
        assert [vid for vid, _ in hits] == brute_force(vectors, ids, vectors[i], 5)
        assert hits[0][1] == pytest.approx(1.0, abs=1e-5)


async def test_ivf_removal_is_in_place() -> None:
    index, ids, vectors = _ivf_index()
    await index.settle()
    removed = [int(v) for v in ids[:10]]
    assert index.remove(removed) == 10
    assert len(index) == 110 and index._partitions["p"].index.ntotal == 110  # gone from the cells, no tombstones
    assert all(h not in removed for h, _ in index.search("p", vectors[0], k=20))
    assert index.search("p", vectors[0], k=1)[0][0] != removed[0]


async def test_ivf_remove_everything_drops_partition() -> None:
    index, ids, _ = _ivf_index(60)
    await index.settle()
    assert index.kind("p").startswith("ivf")
    index.remove([int(v) for v in ids])
    assert len(index) == 0 and index.partitions() == 0


async def test_replace_vid_ivf() -> None:
    index, ids, vectors = _ivf_index()
    await index.settle()
    target = int(ids[0])
    new = -vectors[0]
    index.add("p", target, new)
    assert len(index) == len(ids) and index._partitions["p"].index.ntotal == len(ids)
    assert index.search("p", new, k=1) == [(target, pytest.approx(1.0, abs=1e-5))]


async def test_changes_during_a_build_are_replayed_onto_the_new_index() -> None:
    hold = threading.Event()
    index, ids, vectors = _ivf_index(hold=hold)
    assert index.building() == 1
    index.remove([int(ids[0])])  # removed while building
    index.add("p", int(ids[1]), -vectors[1])  # replaced while building
    index.add("p", 7, axis(0))  # added while building
    index.add("q", 8, axis(0))  # another partition
    assert index.building() == 1 and index.kind("p") == "flat"  # all of it while the build was in flight
    hold.set()
    await index.settle()
    assert index.kind("p").startswith("ivf") and len(index) == 121
    assert all(vid != int(ids[0]) for vid, _ in index.search("p", vectors[0], k=120))
    assert index.search("p", -vectors[1], k=1) == [(int(ids[1]), pytest.approx(1.0, abs=1e-5))]
    assert index.search("p", vectors[1], k=1)[0][0] != int(ids[1])
    assert index.search("p", axis(0), k=1)[0] == (7, pytest.approx(1.0, abs=1e-5))
    assert index.search("q", axis(0)) == [(8, pytest.approx(1.0, abs=1e-6))]


async def test_ivf_is_rebuilt_with_more_cells_when_outgrown() -> None:
    rng = np.random.default_rng(3)
    vectors = unit(rng, 300)
    ids = np.arange(1, 301, dtype=np.int64)
    index = VectorIndex(DIM, ivf_threshold=50)
    index.add_many("p", ids[:60], vectors[:60])
    await index.settle()
    assert index.kind("p") == f"ivf{lists_for(60)}" == "ivf8"
    for i in range(60, 300):
        index.add("p", int(ids[i]), vectors[i])  # one by one, as puts arrive
    await index.settle()
    assert index.kind("p") == f"ivf{lists_for(300)}" == "ivf16" and len(index) == 300
    assert index.search("p", vectors[5], k=1)[0][0] == 6


async def test_bulk_load_builds_off_the_loop_and_keeps_concurrent_changes() -> None:
    rng = np.random.default_rng(4)
    vectors = unit(rng, 200)
    ids = np.arange(1, 201, dtype=np.int64)
    index = VectorIndex(DIM, ivf_threshold=50)
    loading = asyncio.create_task(index.load("p", ids, vectors))
    await asyncio.sleep(0)  # the build is under way
    assert index.building() == 1 and len(index) == 200
    index.remove([1])
    index.add("p", 2, axis(1))
    await loading
    assert index.kind("p").startswith("ivf") and len(index) == 199
    assert index.search("p", axis(1), k=1) == [(2, pytest.approx(1.0, abs=1e-5))]
    assert index.search("p", vectors[0], k=1)[0][0] != 1
    assert index.search("p", vectors[9], k=1) == [(10, pytest.approx(1.0, abs=1e-5))]
    small = VectorIndex(DIM, ivf_threshold=500)
    await small.load("p", ids, vectors)  # under the threshold: flat, at once
    assert small.kind("p") == "flat" and small.building() == 0


async def test_a_failed_build_leaves_every_vector_searchable(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    vectors = unit(rng, 120)
    ids = np.arange(1, 121, dtype=np.int64)
    index = VectorIndex(DIM, ivf_threshold=50)

    def fail(*args: object) -> None:
        raise MemoryError("no room for the new index")

    monkeypatch.setattr(index, "_build_ivf", fail)
    await index.load("p", ids, vectors)  # the bulk path
    index.add_many("q", ids + 1000, vectors)  # the conversion path
    await index.settle()
    for name, offset in (("p", 0), ("q", 1000)):
        assert index.kind(name) == "flat"
        assert index.search(name, vectors[7], k=1) == [(8 + offset, pytest.approx(1.0, abs=1e-5))]
    assert index._partitions["q"].retry_at == 240  # not retried on every add


async def test_ivf_recall_on_near_duplicates() -> None:
    """Noisy copies (cosine ~0.95) of stored vectors find their original first, with 16 of 128 cells probed."""
    rng = np.random.default_rng(6)
    dim, n = 64, 20_000
    stored = rng.standard_normal((n, dim)).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    index = VectorIndex(dim, ivf_threshold=1000)
    await index.load("p", np.arange(n, dtype=np.int64), stored)
    assert index.kind("p") == "ivf128"
    rows = rng.choice(n, 300, replace=False)
    queries = stored[rows] + rng.standard_normal((300, dim)).astype(np.float32) * np.float32(0.33 / np.sqrt(dim))
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found = sum(index.search("p", q, k=1)[0][0] == row for q, row in zip(queries, rows, strict=True))
    assert found / 300 >= 0.95


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
