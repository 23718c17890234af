"""The vector index: FAISS inner-product search over L2-normalised vectors, one sub-index per partition.

A partition is searched on its own, so isolation (tenant, namespace, context) holds before any similarity is
computed. Each partition uses exact search (IndexFlatIP) while small and switches to HNSW past a configurable size.
HNSW cannot delete, so deletions there are tombstones, filtered from results and compacted by a rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np


@dataclass
class _Partition:
    index: Any  # faiss.IndexIDMap2 over a flat or HNSW index (faiss's stubs do not describe the wrappers)
    hnsw: bool = False
    tombstones: set[int] = field(default_factory=set)

    @property
    def live(self) -> int:
        return int(self.index.ntotal) - len(self.tombstones)


class VectorIndex:
    """Partitioned FAISS index. Not thread-safe: call it from one thread (the event loop)."""

    def __init__(self, dim: int, hnsw_threshold: int = 50_000, hnsw_m: int = 32, ef_search: int = 64) -> None:
        # One query at a time gains nothing from OpenMP threads, and their start-up waits for a free core: on a
        # busy 2-core sidecar (the embedder's threads still spinning) a 0.1 ms search took 5 ms with two.
        faiss.omp_set_num_threads(1)
        self.dim = dim
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self._partitions: dict[str, _Partition] = {}
        self._where: dict[int, str] = {}  # vid -> partition

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, vid: int) -> bool:
        return vid in self._where

    def _flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _hnsw(self) -> Any:
        inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = self.ef_search
        return faiss.IndexIDMap2(inner)

    def add(self, partition: str, vid: int, vector: np.ndarray) -> None:
        """Add (or replace) one vector."""
        self.add_many(partition, np.array([vid], dtype=np.int64), vector.reshape(1, -1))

    def add_many(self, partition: str, vids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors of one partition in one call (used by the rebuild at start)."""
        self.remove([int(v) for v in vids if int(v) in self._where])
        part = self._partitions.get(partition)
        if part is None:
            part = self._partitions[partition] = _Partition(self._flat())
        if part.tombstones.intersection(int(v) for v in vids):
            self._rebuild(part, hnsw=True)  # an id coming back must not stay hidden behind its tombstone
        part.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), vids.astype(np.int64))
        for vid in vids:
            self._where[int(vid)] = partition
        if not part.hnsw and part.index.ntotal > self.hnsw_threshold:
            self._rebuild(part, hnsw=True)

    def remove(self, vids: list[int]) -> int:
        """Remove vectors by id; unknown ids are ignored. Returns how many were removed."""
        removed = 0
        for vid in vids:
            name = self._where.pop(vid, None)
            if name is None:
                continue
            removed += 1
            part = self._partitions[name]
            if part.hnsw:
                part.tombstones.add(vid)
                if len(part.tombstones) > max(1000, part.index.ntotal // 5):
                    self._rebuild(part, hnsw=True)
            else:
                part.index.remove_ids(np.array([vid], dtype=np.int64))
            if part.live == 0:
                del self._partitions[name]
        return removed

    def _rebuild(self, part: _Partition, hnsw: bool) -> None:
        ids = faiss.vector_to_array(part.index.id_map).astype(np.int64)
        vectors = part.index.index.reconstruct_n(0, part.index.ntotal)
        keep = np.array([int(i) not in part.tombstones for i in ids], dtype=bool)
        part.index = self._hnsw() if hnsw else self._flat()
        part.hnsw = hnsw
        part.tombstones = set()
        if keep.any():
            part.index.add_with_ids(vectors[keep], ids[keep])

    def search(self, partition: str, vector: np.ndarray, k: int = 4) -> list[tuple[int, float]]:
        """The k nearest vectors of a partition as (vid, cosine similarity), best first."""
        part = self._partitions.get(partition)
        if part is None:
            return []
        want = min(k + len(part.tombstones), int(part.index.ntotal))
        scores, ids = part.index.search(np.ascontiguousarray(vector.reshape(1, -1), dtype=np.float32), want)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        return [(i, s) for i, s in hits if i not in part.tombstones][:k]

    def clear(self) -> None:
        """Drop everything."""
        self._partitions.clear()
        self._where.clear()

    def partitions(self) -> int:
        """How many partitions hold vectors."""
        return len(self._partitions)
