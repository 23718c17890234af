"""The vector index: FAISS inner-product search over L2-normalised vectors, one sub-index per partition.

A partition is searched on its own, so isolation (tenant, namespace, context) holds before any similarity is
computed. Each partition uses exact search (IndexFlatIP) while small and an inverted-file index (IVF-Flat) past a
configurable size: k-means cells of about sqrt(n) vectors each, `nprobe` of them searched per query. IVF was
chosen over HNSW because a replica must build it quickly at start (1M vectors: ~10 s on 2 cores, where HNSW took
12 minutes) and because it deletes in place (a hash-table id map), with no tombstones to compact. The vectors are
kept exactly (no compression), so scores are true cosines.

Building a larger index (flat -> IVF, or an IVF whose cells have grown 4x) runs on a worker thread: the partition
keeps serving from its current index, changes made meanwhile are applied to it and journalled, and the journal is
replayed onto the new index before it replaces the old one (on the next call that touches the partition).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("cachecade.index")
MAX_LISTS = 4096  # k-means for more cells costs more at start than they save per query on a sidecar
TRAIN_POINTS_PER_LIST = 64  # training sample per cell (FAISS's own default cap is 256)
TRAIN_ITERATIONS = 10


def lists_for(n: int) -> int:
    """IVF cells for n vectors: the power of two nearest sqrt(n), so a probed cell holds about sqrt(n)."""
    return max(1, min(MAX_LISTS, 2 ** round(math.log2(math.sqrt(max(n, 1))))))


def _selector(vids: np.ndarray) -> tuple[Any, np.ndarray]:
    """An IDSelectorArray over `vids` (what an IVF's hash-table id map removes by), and the array it points into,
    which the caller keeps alive while the selector is used."""
    ids = np.ascontiguousarray(vids, dtype=np.int64)
    return faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)), ids


@dataclass
class _Partition:
    index: Any  # faiss.IndexIDMap2 over IndexFlatIP, or IndexIVFFlat (faiss's stubs do not describe them)
    lists: int = 0  # IVF cells; 0 while flat
    size: int = 0  # vectors in the partition (also those of a build in flight)
    build: Future[Any] | None = None  # a larger index being built on the worker thread
    journal: list[tuple[np.ndarray, np.ndarray | None]] = field(default_factory=list)  # (vids, vectors|None=removal)
    retry_at: int = 0  # after a failed build, the size at which to try again


class VectorIndex:
    """Partitioned FAISS index. Not thread-safe: call it from one thread (the event loop); only index builds run
    elsewhere, on its own worker thread."""

    def __init__(self, dim: int, ivf_threshold: int = 50_000, nprobe: int = 16) -> None:
        # One query at a time gains nothing from OpenMP threads, and their start-up waits for a free core: on a
        # busy 2-core sidecar (the embedder's threads still spinning) a 0.1 ms search took 5 ms with two. The
        # setting is per thread: builds on the worker thread use every core.
        faiss.omp_set_num_threads(1)
        self.dim = dim
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self._partitions: dict[str, _Partition] = {}
        self._where: dict[int, str] = {}  # vid -> partition
        self._worker: ThreadPoolExecutor | None = None
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, vid: int) -> bool:
        return vid in self._where

    def _flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    # --- changes -----------------------------------------------------------------------------------------------

    def add(self, partition: str, vid: int, vector: np.ndarray) -> None:
        """Add (or replace) one vector."""
        self.add_many(partition, np.array([vid], dtype=np.int64), vector.reshape(1, -1))

    def add_many(self, partition: str, vids: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) vectors of one partition in one call."""
        vids = np.ascontiguousarray(vids, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(vids), self.dim)
        self.remove([int(v) for v in vids if int(v) in self._where])
        part = self._settled(partition)
        if part is None:
            part = self._partitions[partition] = _Partition(self._flat())
        part.index.add_with_ids(vectors, vids)
        if part.build is not None:
            part.journal.append((vids, vectors))
        for vid in vids:
            self._where[int(vid)] = partition
        part.size += len(vids)
        self._grow_if_due(part)

    def remove(self, vids: list[int]) -> int:
        """Remove vectors by id; unknown ids are ignored. Returns how many were removed."""
        by_partition: dict[str, list[int]] = {}
        for vid in vids:
            name = self._where.pop(vid, None)
            if name is not None:
                by_partition.setdefault(name, []).append(vid)
        for name, gone in by_partition.items():
            part = self._settled(name)
            assert part is not None  # every id in _where has its partition
            ids = np.array(gone, dtype=np.int64)
            self._remove_from(part.index, ids)
            if part.build is not None:
                part.journal.append((ids, None))
            part.size -= len(gone)
            if part.size == 0 and part.build is None:
                del self._partitions[name]
        return sum(len(gone) for gone in by_partition.values())

    def _remove_from(self, index: Any, vids: np.ndarray) -> None:
        if isinstance(index, faiss.IndexIVF):
            selector, _keep = _selector(vids)
            index.remove_ids(selector)
        else:
            index.remove_ids(vids)

    def clear(self) -> None:
        """Drop everything (a build in flight finishes on its thread and is thrown away)."""
        self._partitions.clear()
        self._where.clear()

    # --- lookups -----------------------------------------------------------------------------------------------

    def search(self, partition: str, vector: np.ndarray, k: int = 4) -> list[tuple[int, float]]:
        """The k nearest vectors of a partition as (vid, cosine similarity), best first."""
        part = self._settled(partition)
        if part is None or part.index.ntotal == 0:
            return []
        query = np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32)
        scores, ids = part.index.search(query, min(k, int(part.index.ntotal)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def partitions(self) -> int:
        """How many partitions hold vectors."""
        return len(self._partitions)

    def kind(self, partition: str) -> str:
        """'flat', 'ivf<cells>' or '' (no such partition): for stats and benchmarks."""
        part = self._settled(partition)
        if part is None:
            return ""
        return f"ivf{part.lists}" if part.lists else "flat"

    # --- bulk load and builds ------------------------------------------------------------------------------------

    async def load(self, partition: str, vids: np.ndarray, vectors: np.ndarray) -> None:
        """Load a partition in bulk (the rebuild at start): past the IVF threshold the index is built on the worker
        thread while the event loop stays free, and changes made meanwhile are kept (journalled)."""
        if partition in self._partitions or len(vids) <= self.ivf_threshold:
            self.add_many(partition, vids, vectors)
            return
        part = self._partitions[partition] = _Partition(self._flat())
        vids = np.ascontiguousarray(vids, dtype=np.int64)
        for vid in vids:
            self._where[int(vid)] = partition
        part.size = len(vids)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._start_build(part, vids, vectors)
        await self.settle()
        if not part.lists and self._partitions.get(partition) is part:
            # The build failed (logged): search the loaded vectors exactly rather than lose them. Skip those removed
            # meanwhile and those added again meanwhile (the flat index already holds their newer vectors).
            newer = set(faiss.vector_to_array(part.index.id_map).tolist())
            keep = np.array([self._where.get(int(v)) == partition and int(v) not in newer for v in vids], dtype=bool)
            part.index.add_with_ids(vectors[keep], vids[keep])

    async def settle(self) -> None:
        """Wait for every build in flight and install its index."""
        while pending := [p.build for p in self._partitions.values() if p.build is not None]:
            waiting = [asyncio.wrap_future(f) for f in pending]
            await asyncio.wait(waiting)
            for done in waiting:
                done.exception()  # retrieved, so asyncio does not report it again: _settled logs a failure
            for name in list(self._partitions):
                self._settled(name)

    def building(self) -> int:
        """How many partitions have a build in flight."""
        return sum(p.build is not None for p in self._partitions.values())

    def _grow_if_due(self, part: _Partition) -> None:
        """Start a build when a flat partition passes the threshold or an IVF one has 4x the vectors its cells
        were made for (its probed cells would hold twice as many)."""
        n = int(part.index.ntotal)
        if part.build is not None or n < part.retry_at:
            return
        if (part.lists == 0 and n > self.ivf_threshold) or (part.lists and lists_for(n) >= 2 * part.lists):
            self._start_build(part, *self._contents(part))

    def _contents(self, part: _Partition) -> tuple[np.ndarray, np.ndarray]:
        """(vids, vectors) of a partition's current index, copied."""
        index = part.index
        if not part.lists:
            vids = faiss.vector_to_array(index.id_map).astype(np.int64)
            return vids, index.index.reconstruct_n(0, index.ntotal)
        invlists, ids, rows = index.invlists, [], []
        for cell in range(index.nlist):
            n = invlists.list_size(cell)
            if n:
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(cell), n).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(cell), n * invlists.code_size)
                rows.append(np.frombuffer(codes, dtype=np.float32).reshape(n, self.dim).copy())
        return np.concatenate(ids), np.concatenate(rows)

    def _start_build(self, part: _Partition, vids: np.ndarray, vectors: np.ndarray) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachecade-index")
        lists = lists_for(len(vids))
        sample = self._rng.choice(len(vids), size=min(len(vids), TRAIN_POINTS_PER_LIST * lists), replace=False)
        part.build = self._worker.submit(self._build_ivf, lists, vids, vectors, np.sort(sample))
        part.journal = []

    def _build_ivf(self, lists: int, vids: np.ndarray, vectors: np.ndarray, sample: np.ndarray) -> Any:
        """On the worker thread: train an IVF-Flat index on a sample and add every vector (FAISS releases the
        GIL, so the event loop keeps running)."""
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = TRAIN_ITERATIONS
        index.cp.min_points_per_centroid = 1  # small partitions (tests) train on what there is, without a warning
        index.train(vectors[sample])
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]  # removal by id, in place
        index.add_with_ids(vectors, vids)
        index.nprobe = min(self.nprobe, lists)
        return index

    def _settled(self, name: str) -> _Partition | None:
        """The partition, with a finished build installed first: the journal replayed onto the new index."""
        part = self._partitions.get(name)
        if part is None or part.build is None or not part.build.done():
            return part
        build, journal = part.build, part.journal
        part.build, part.journal = None, []
        try:
            index = build.result()
        except Exception:
            log.exception("building the IVF index of a partition of %d vectors failed; it stays %s", part.size,
                          "flat" if not part.lists else f"IVF with {part.lists} cells")  # fmt: skip
            part.retry_at = 2 * int(part.index.ntotal)
        else:
            for vids, vectors in journal:
                self._remove_from(index, vids)
                if vectors is not None:
                    index.add_with_ids(vectors, vids)
            part.index, part.lists = index, int(index.nlist)
        if part.size == 0:
            del self._partitions[name]
            return None
        return part
