"""The cascade's pre-generation router: before a local tier runs, predict from the query's embedding (which the
cache has already computed) whether the tier's answer will pass its gate and be right, and skip the tier when that
is unlikely (`x-escalated: smollm2:skipped-by-router`).

Per tier it keeps the queries the tier answered (newest `memory`): the embedding, the gate's score, whether the
answer was complete and not degenerate, and whether it was right when a label says so (an escalation compared with
the upstream's answer, a shadow check, client feedback, or a `cachecade calibrate-cascade` run: -1 unknown). An
answer *passes* when it was complete, scored >= the tier's gate threshold now in force (so a learnt threshold
changes the prediction at once, with no forgetting), and is not labelled wrong.

The prediction for a query: its neighbours are the tier's `k` nearest remembered queries at cosine >=
`min_similarity` (0.5 on the packaged embedder groups questions of one shape: "What is the capital of France?"
and "... of Kenya?" are about 0.57 apart, an unrelated question 0.1; chosen on one seed of
bench/learning_cascade.py's stream and checked on another, docs/learning.md); the tier's pass rate over all its
memory is the prior. The estimated pass probability is (neighbours that passed + `prior_weight` x prior) / (neighbours +
`prior_weight`): one close neighbour that passed is enough to try the tier; with no close neighbours the tier's
own record decides. A tier is skipped when that estimate is under `max_pass_rate`, and never before it has
`min_tries` remembered answers (it starts conservative: a tier with no record is tried). A share `explore` of
would-be skips is tried anyway, so a tier whose answers start passing (a better model, a looser gate) is learnt
again. The last tier of a route is never skipped.

Shared: with an entry store, every sample and label is appended to the store's log (SQLite embedded, a Redis stream
shared) in the background, and the log is read back from a cursor at most every `sync_s` seconds, so the replicas
learn from each other and a restart starts from what was learnt before.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("cachecade.router")
UNKNOWN, WRONG, RIGHT = -1, 0, 1


class RouteLog(Protocol):
    """Where the router's samples are shared (cache.store.EntryStore has these)."""

    async def add_route_samples(self, samples: list[str], keep: int) -> None: ...

    async def route_samples(self, after: str, limit: int) -> list[tuple[str, str]]: ...


class _Memory:
    """A tier's newest `capacity` answered queries (a ring buffer, searched in place)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.vectors: np.ndarray | None = None  # allocated at the first sample, when the dimension is known
        self.score = np.zeros(capacity, dtype=np.float32)
        self.complete = np.zeros(capacity, dtype=bool)
        self.right = np.full(capacity, UNKNOWN, dtype=np.int8)
        self.ids: list[str] = [""] * capacity
        self.slots: dict[str, int] = {}  # request id -> slot, for labels that come later
        self.count = self.next = 0

    def add(self, vector: np.ndarray, score: float, complete: bool, right: int, request_id: str) -> None:
        if self.vectors is None:
            self.vectors = np.zeros((self.capacity, len(vector)), dtype=np.float32)
        slot = self.next
        self.slots.pop(self.ids[slot], None)
        self.vectors[slot], self.score[slot], self.complete[slot], self.right[slot] = vector, score, complete, right
        self.ids[slot] = request_id
        if request_id:
            self.slots[request_id] = slot
        self.next = (slot + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def passes(self, threshold: float) -> np.ndarray:
        n = self.count
        return self.complete[:n] & (self.score[:n] >= threshold) & (self.right[:n] != WRONG)


@dataclass(frozen=True)
class Prediction:
    """The router's estimate for one query and tier, and what it rests on."""

    pass_rate: float  # estimated probability that the tier's answer passes
    neighbours: int  # close neighbours found
    neighbours_passed: int
    prior: float  # the tier's pass rate over its memory
    tries: int  # answers remembered for the tier


@dataclass
class RouterStats:
    skipped: dict[str, int] = field(default_factory=dict)
    explored: dict[str, int] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=lambda: {"right": 0, "wrong": 0, "unmatched": 0})
    synced: dict[str, int] = field(default_factory=lambda: {"written": 0, "read": 0, "errors": 0})


class Router:
    """Skips local tiers whose answers to this kind of query do not pass."""

    def __init__(self, k: int = 8, min_similarity: float = 0.5, max_pass_rate: float = 0.1, prior_weight: float = 2.0,
                 min_tries: int = 30, explore: float = 0.05, memory: int = 20_000, seed: int | None = None,
                 store: RouteLog | None = None, sync_s: float = 2.0) -> None:  # fmt: skip
        self.k, self.min_similarity, self.max_pass_rate = k, min_similarity, max_pass_rate
        self.prior_weight, self.min_tries, self.explore, self.memory = prior_weight, min_tries, explore, memory
        self.rng = random.Random(seed)
        self.tiers: dict[str, _Memory] = {}
        self.stats = RouterStats()
        self.store, self.sync_s = store, sync_s
        self.replica = uuid.uuid4().hex[:12]  # its own samples, read back from the shared log, are skipped
        self._outbox: list[str] = []
        self._cursor, self._synced_at = "", 0.0
        self._sync: asyncio.Task[None] | None = None

    def _memory(self, tier: str) -> _Memory:
        memory = self.tiers.get(tier)
        if memory is None:
            memory = self.tiers[tier] = _Memory(self.memory)
        return memory

    # --- learning ------------------------------------------------------------------------------------------------

    def record(self, tier: str, vector: np.ndarray, score: float, complete: bool, request_id: str = "",
               right: int = UNKNOWN) -> None:  # fmt: skip
        """A tier answered this query: the gate's score, whether the answer was complete (not cut off, not
        degenerate), and whether it was right when that is known."""
        vector = np.asarray(vector, dtype=np.float32)
        self._memory(tier).add(vector, score, complete, right, request_id)
        if self.store is not None:
            vec = base64.b64encode(vector.astype(np.float16).tobytes()).decode()
            self._outbox.append(json.dumps({"r": self.replica, "t": tier, "id": request_id, "v": vec,
                                            "s": round(float(score), 5), "c": complete, "y": right}))  # fmt: skip

    def label(self, tier: str, request_id: str, right: bool) -> bool:
        """A label on the tier's answer to a request (False when the router does not remember it)."""
        self.stats.labels["right" if right else "wrong"] += 1
        if self.store is not None:
            self._outbox.append(json.dumps({"r": self.replica, "t": tier, "id": request_id, "y": int(right)}))
        return self._apply_label(tier, request_id, int(right))

    def _apply_label(self, tier: str, request_id: str, right: int) -> bool:
        memory = self.tiers.get(tier)
        slot = memory.slots.get(request_id) if memory is not None and request_id else None
        if memory is None or slot is None:
            self.stats.labels["unmatched"] += 1
            return False
        memory.right[slot] = right
        return True

    def seed(self, tier: str, vectors: np.ndarray, scores: Iterable[float], complete: Iterable[bool],
             right: Iterable[bool]) -> None:  # fmt: skip
        """Labelled answers from an offline run (`cachecade calibrate-cascade --router`)."""
        for vector, score, done, ok in zip(vectors, scores, complete, right, strict=True):
            self.record(tier, vector, float(score), bool(done), right=RIGHT if ok else WRONG)

    # --- predicting ----------------------------------------------------------------------------------------------

    def predict(self, tier: str, threshold: float, vector: np.ndarray) -> Prediction:
        memory = self.tiers.get(tier)
        if memory is None or memory.vectors is None or memory.count == 0:
            return Prediction(1.0, 0, 0, 1.0, 0)
        passes = memory.passes(threshold)
        prior = float(passes.mean())
        similarity = memory.vectors[: memory.count] @ np.asarray(vector, dtype=np.float32)
        k = min(self.k, memory.count)
        nearest = np.argpartition(-similarity, k - 1)[:k]
        close = nearest[similarity[nearest] >= self.min_similarity]
        passed = int(passes[close].sum())
        rate = (passed + self.prior_weight * prior) / (len(close) + self.prior_weight)
        return Prediction(rate, len(close), passed, prior, memory.count)

    def skip(self, tier: str, threshold: float, vector: np.ndarray | None) -> bool:
        """True when the tier should be skipped for this query."""
        self.maybe_sync()
        if vector is None:
            return False
        prediction = self.predict(tier, threshold, vector)
        if prediction.tries < self.min_tries or prediction.pass_rate >= self.max_pass_rate:
            return False
        if self.rng.random() < self.explore:
            self.stats.explored[tier] = self.stats.explored.get(tier, 0) + 1
            return False
        self.stats.skipped[tier] = self.stats.skipped.get(tier, 0) + 1
        return True

    def summary(self) -> dict[str, Any]:
        """Per tier: answers remembered and their labels; the counters (GET /admin/stats)."""
        tiers = {name: {"remembered": m.count, "labelled_right": int((m.right[: m.count] == RIGHT).sum()),
                        "labelled_wrong": int((m.right[: m.count] == WRONG).sum())}
                 for name, m in self.tiers.items()}  # fmt: skip
        return {"tiers": tiers, "skipped": self.stats.skipped, "explored": self.stats.explored,
                "labels": self.stats.labels, "synced": self.stats.synced, "shared": self.store is not None}  # fmt: skip

    # --- sharing -------------------------------------------------------------------------------------------------

    def maybe_sync(self) -> None:
        """Start a background sync with the store when one is due (never waits for it)."""
        if self.store is None or (self._sync is not None and not self._sync.done()):
            return
        if time.monotonic() - self._synced_at < self.sync_s:
            return
        try:
            self._sync = asyncio.get_running_loop().create_task(self.sync())
        except RuntimeError:  # no loop (a synchronous caller): the next call syncs
            return

    async def sync(self) -> None:
        """Write this replica's new samples and labels to the store, then read the others' since the cursor."""
        if self.store is None:
            return
        self._synced_at = time.monotonic()
        outbox, self._outbox = self._outbox, []
        try:
            if outbox:
                await self.store.add_route_samples(outbox, self.memory * 2)
                self.stats.synced["written"] += len(outbox)
            while True:
                rows = await self.store.route_samples(self._cursor, 1000)
                for cursor, raw in rows:
                    self._cursor = cursor
                    self._read(raw)
                if len(rows) < 1000:
                    break
        except Exception as exc:  # the store is down: learn locally and retry later (what was written is lost)
            self.stats.synced["errors"] += 1
            log.warning("router: could not sync with the store: %s", exc)

    def _read(self, raw: str) -> None:
        try:
            sample = json.loads(raw)
            if sample.get("r") == self.replica:
                return
            tier, request_id, right = str(sample["t"]), str(sample.get("id", "")), int(sample.get("y", UNKNOWN))
            if "v" not in sample:
                self._apply_label(tier, request_id, right)
                return
            vector = np.frombuffer(base64.b64decode(sample["v"]), dtype=np.float16).astype(np.float32)
            self._memory(tier).add(vector, float(sample["s"]), bool(sample["c"]), right, request_id)
            self.stats.synced["read"] += 1
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("router: skipped a malformed sample from the store: %s", exc)
