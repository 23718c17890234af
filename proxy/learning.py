"""Learning from traffic: what answered each request is remembered, clients label answers with
`POST /v1/feedback`, and a semantic threshold with a target error rate moves to hold it (cache/labels.py has the
rule and its guarantee).

- **Remembered**: every answer, keyed by the caller's API key id and the request id, for `served_ttl_s`
  (written after the response, off the request path).
- **Feedback**: `{"request_id": ..., "good": false}` with the same API key as the request (another key's request
  id is a 404, as is one forgotten); one label per request (a second is a 409). A bad answer that the cache holds
  (served from it, or stored from this answer) is deleted at once. A label on a semantic hit counts against the
  threshold that served it.
- **Thresholds**: per namespace, where the policy sets `max_error` (or `namespace_max_error`): after each label,
  the rule runs on that scope's labels; a change is written to the cache policy (`verifier_namespace_thresholds`
  with the verifier on, else `namespace_thresholds`), logged, counted, and shared with the other replicas like an
  admin change. It never loosens below the threshold configured at start.

Partial (what the learning issue asks that is not here yet): shadow checks against the upstream, labels from
escalations, local-tier thresholds and the pre-generation router.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cache.errors import CacheError
from cache.labels import Decision, Label, Served, decide, scope
from cache.policy import CachePolicy
from cache.response_cache import ResponseCache
from cache.store import vid_from_id
from proxy.context import RequestContext
from proxy.errors import Conflict, NotFound
from proxy.outcome import Outcome

log = logging.getLogger("cachecade.learning")
KEEP_LABELS = 5000  # per scope, newest first: what the rule reads


@dataclass
class LearningStats:
    labels: dict[str, int] = field(default_factory=lambda: {"good": 0, "bad": 0})
    entries_deleted: int = 0
    changes: dict[str, int] = field(default_factory=lambda: {"tightened": 0, "loosened": 0})
    remember_errors: int = 0


class Learner:
    """Remembers what answered, takes feedback, and moves semantic thresholds to hold the operator's bound."""

    def __init__(self, cache: ResponseCache, served_ttl_s: float,
                 publish: Callable[[CachePolicy], Awaitable[None]]) -> None:  # fmt: skip
        self.cache = cache
        self.served_ttl_s = served_ttl_s
        self.publish = publish
        self.floor = cache.policy.model_copy(deep=True)  # the thresholds configured at start: never looser
        self.stats = LearningStats()
        self.decisions: dict[str, Decision] = {}  # the last decision per scope
        self._pending: set[asyncio.Task[None]] = set()

    # --- remembering ---------------------------------------------------------------------------------------------

    def served(self, ctx: RequestContext, outcome: Outcome) -> Served:
        """What answered, and which threshold decided it."""
        tier, the_scope, score = "upstream", None, None
        if outcome.cache == "HIT-EXACT":
            tier = "exact"
        elif outcome.cache == "HIT-SEMANTIC":
            tier = "semantic"
            verified = outcome.verifier == "accept" and outcome.verifier_score is not None
            the_scope = scope("semantic", "verifier" if verified else "cosine", outcome.namespace)
            score = outcome.verifier_score if verified else outcome.similarity
        elif outcome.served_by.startswith("local:"):
            tier = outcome.served_by
            if outcome.confidence is not None:
                the_scope, score = scope(tier, "confidence", outcome.namespace), outcome.confidence
        return Served(ctx.request_id, ctx.key_id, outcome.namespace, outcome.model, tier, outcome.entry_id,
                      the_scope, score, time.time())  # fmt: skip

    def remember(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Write what answered in the background (the response never waits for it)."""
        if self.served_ttl_s <= 0 or not ctx.request_id:
            return
        record = self.served(ctx, outcome)
        task = asyncio.get_running_loop().create_task(self._remember(record))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remember(self, record: Served) -> None:
        try:
            await self.cache.store.remember(record, record.at + self.served_ttl_s)
        except CacheError as exc:  # best effort: an answer that cannot be remembered cannot be labelled
            self.stats.remember_errors += 1
            log.warning("could not remember request %s for feedback: %s", record.request_id, exc)

    async def drain(self) -> None:
        """Wait for the records being written (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # --- feedback ------------------------------------------------------------------------------------------------

    async def feedback(self, key_id: str, request_id: str, good: bool) -> dict[str, Any]:
        """Label one answer; a bad cached one is deleted, and the threshold that served it reconsidered."""
        now = time.time()
        record = await self.cache.store.recall(key_id, request_id, now)
        if record is None and self._pending:  # asked right after its answer: its record may still be on its way
            await self.drain()
            record = await self.cache.store.recall(key_id, request_id, now)
        if record is None:
            raise NotFound(f"no answer with request id {request_id!r} for this API key (unknown, another key's, "
                           f"or older than {self.served_ttl_s:.0f} s)", param="request_id")  # fmt: skip
        if not await self.cache.store.claim_label(key_id, request_id):
            raise Conflict(f"request {request_id!r} already has feedback", param="request_id")
        self.stats.labels["good" if good else "bad"] += 1
        deleted = False
        if not good and record.entry_id is not None and (vid := vid_from_id(record.entry_id)) is not None:
            deleted = bool(await self.cache.delete([vid]))
            self.stats.entries_deleted += deleted
            log.info("feedback: request %s was a bad answer; cache entry %s deleted", request_id, record.entry_id)
        out: dict[str, Any] = {"request_id": request_id, "good": good, "tier": record.tier,
                               "entry_deleted": deleted}  # fmt: skip
        if record.scope is not None and record.score is not None:
            await self.cache.store.add_label(Label(record.scope, record.score, good, "feedback", now, request_id),
                                             KEEP_LABELS)  # fmt: skip
            decision = await self.reconsider(record.scope, record.namespace)
            if decision is not None:
                out["threshold"] = decision.summary()
        return out

    # --- thresholds ----------------------------------------------------------------------------------------------

    async def reconsider(self, the_scope: str, namespace: str) -> Decision | None:
        """Run the rule on a semantic scope's labels and apply its threshold (None: not a learning scope)."""
        policy = self.cache.policy
        delta = policy.max_error_for(namespace)
        tier, scale = the_scope.split("/", 2)[:2]
        if delta is None or tier != "semantic":
            return None
        field_name, current = _namespace_threshold(policy, scale, namespace)
        floor = _namespace_threshold(self.floor, scale, namespace)[1]
        labels = await self.cache.store.labels(the_scope, KEEP_LABELS)
        decision = decide(labels, current, delta, floor=min(floor, current), min_labels=policy.learn_min_labels,
                          confidence=policy.learn_confidence)  # fmt: skip
        self.decisions[the_scope] = decision
        if decision.threshold != current:
            changed = {**getattr(policy, field_name), namespace: decision.threshold}
            self.cache.policy = policy.model_copy(update={field_name: changed})
            self.stats.changes[decision.reason] += 1
            log.warning("learning %s the %s threshold of namespace %r: %.4f -> %.4f (%d labels at it, %d wrong, "
                        "error bound %.4f, target %.4f)", decision.reason, scale, namespace, current,
                        decision.threshold, decision.labels, decision.errors, decision.bound, delta)  # fmt: skip
            await self.publish(self.cache.policy)
        return decision

    async def report(self) -> dict[str, Any]:
        """Per scope: the labels behind it, and the last decision (GET /admin/learning)."""
        scopes = {}
        for the_scope in await self.cache.store.label_scopes():
            labels = await self.cache.store.labels(the_scope, KEEP_LABELS)
            decision = self.decisions.get(the_scope)
            scopes[the_scope] = {"labels": len(labels), "bad": sum(not label.good for label in labels),
                                 "decision": decision.summary() if decision else None,
                                 "recent": [{"score": round(label.score, 4), "good": label.good,
                                             "source": label.source, "request_id": label.request_id}
                                            for label in labels[:20]]}  # fmt: skip
        return {"served_ttl_s": self.served_ttl_s, "max_error": self.cache.policy.max_error,
                "namespace_max_error": self.cache.policy.namespace_max_error, "scopes": scopes,
                "stats": {"labels": self.stats.labels, "entries_deleted": self.stats.entries_deleted,
                          "changes": self.stats.changes, "remember_errors": self.stats.remember_errors}}  # fmt: skip


def _namespace_threshold(policy: CachePolicy, scale: str, namespace: str) -> tuple[str, float]:
    """The policy field that holds a namespace's semantic threshold on this scale, and its value there."""
    if scale == "verifier":
        return "verifier_namespace_thresholds", policy.verifier_namespace_thresholds.get(
            namespace, policy.verifier_threshold
        )
    return "namespace_thresholds", policy.namespace_thresholds.get(namespace, policy.threshold)
