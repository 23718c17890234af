"""The cascade's pre-generation router: before a local tier runs, predict from the query's embedding (which the
cache has already computed) whether the tier's answer will pass its gate, and skip the tier when its nearest
labelled queries say it will not (`x-escalated: smollm2:skipped-by-router`). Cosine 0.6 on the packaged
embedder groups questions of one shape ("What is the capital of France?" and "... of Spain?" are 0.6-0.7 apart;
an unrelated question 0.1).

Per tier it keeps the query vectors the tier was tried on and whether the gate passed each answer (every
rejection is a labelled negative, every accepted answer a positive), newest `memory` kept. A tier is skipped
when at least `min_neighbours` of its `k` nearest tried queries lie at cosine >= `min_similarity` and fewer than
`max_pass_rate` of them passed. It starts conservative: with no neighbours close enough (a new tier, a new kind of
question) the tier is tried. A share `explore` of would-be skips is tried anyway, so a neighbourhood whose answers
start passing (a better model, another gate threshold) is learnt again; a change of the tier's gate threshold
forgets the tier's memory.

Partial: the memory is this replica's (not in the shared store), starts empty at each start, and learns from the
gate's verdicts only (not yet from feedback or shadow labels, nor from `cachecade calibrate-cascade` runs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np


class _Memory:
    """A tier's newest `capacity` tried queries (a ring buffer, searched in place) and their gate verdicts."""

    def __init__(self, capacity: int, threshold: float) -> None:
        self.capacity, self.threshold = capacity, threshold  # the gate threshold these verdicts were made under
        self.vectors: np.ndarray | None = None  # allocated at the first verdict, when the dimension is known
        self.passed = np.zeros(capacity, dtype=bool)
        self.count = self.next = 0

    def add(self, vector: np.ndarray, passed: bool) -> None:
        if self.vectors is None:
            self.vectors = np.zeros((self.capacity, len(vector)), dtype=np.float32)
        self.vectors[self.next], self.passed[self.next] = vector, passed
        self.next = (self.next + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)


@dataclass
class RouterStats:
    skipped: dict[str, int] = field(default_factory=dict)
    explored: dict[str, int] = field(default_factory=dict)


class Router:
    """Skips local tiers whose answers to similar queries did not pass the gate."""

    def __init__(self, k: int = 8, min_neighbours: int = 5, min_similarity: float = 0.6,
                 max_pass_rate: float = 0.1, explore: float = 0.05, memory: int = 20_000,
                 seed: int | None = None) -> None:  # fmt: skip
        self.k, self.min_neighbours, self.min_similarity = k, min_neighbours, min_similarity
        self.max_pass_rate, self.explore, self.memory = max_pass_rate, explore, memory
        self.rng = random.Random(seed)
        self.tiers: dict[str, _Memory] = {}
        self.stats = RouterStats()

    def _memory(self, tier: str, threshold: float) -> _Memory:
        memory = self.tiers.get(tier)
        if memory is None or memory.threshold != threshold:  # another gate: the old verdicts say nothing
            memory = self.tiers[tier] = _Memory(self.memory, threshold)
        return memory

    def record(self, tier: str, threshold: float, vector: np.ndarray, passed: bool) -> None:
        """The gate's verdict on the tier's answer to this query."""
        self._memory(tier, threshold).add(np.asarray(vector, dtype=np.float32), passed)

    def neighbours(self, tier: str, threshold: float, vector: np.ndarray) -> list[bool]:
        """The verdicts on the tier's nearest tried queries at cosine >= min_similarity (at most k)."""
        memory = self._memory(tier, threshold)
        if memory.vectors is None:
            return []
        similarity = memory.vectors[: memory.count] @ np.asarray(vector, dtype=np.float32)
        nearest = np.argsort(-similarity)[: self.k]
        return [bool(memory.passed[i]) for i in nearest if similarity[i] >= self.min_similarity]

    def skip(self, tier: str, threshold: float, vector: np.ndarray | None) -> bool:
        """True when the tier should be skipped for this query (its neighbours' answers failed the gate)."""
        if vector is None:
            return False
        verdicts = self.neighbours(tier, threshold, vector)
        if len(verdicts) < self.min_neighbours or sum(verdicts) / len(verdicts) >= self.max_pass_rate:
            return False
        if self.rng.random() < self.explore:
            self.stats.explored[tier] = self.stats.explored.get(tier, 0) + 1
            return False
        self.stats.skipped[tier] = self.stats.skipped.get(tier, 0) + 1
        return True
