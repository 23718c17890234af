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

- **Shadow checks**: `shadow_share` of semantic hits and of accepted local answers is asked of the upstream
  again after the response has been sent (a Starlette background task), within `shadow_max_share` of this
  replica's upstream calls and `shadow_daily_tokens` a day; the judge (cache/labels.py) compares the two answers:
  short ones as text (the same words, or the shorter inside the longer), long ones by the cosine of their
  embeddings (>= 0.9). The verdict is a label like feedback's, and a label that goes against the stored answer
  does not delete it (only a client says an answer is wrong for them).

Partial (what the learning issue asks that is not here yet): labels from escalations, local-tier thresholds (local
answers are labelled, but their gates do not move) and the pre-generation router.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.background import BackgroundTask

from cache.errors import CacheError
from cache.labels import Decision, Label, Served, decide, scope
from cache.policy import CachePolicy
from cache.response_cache import ResponseCache
from cache.store import vid_from_id
from local_models.confidence import squad_normalise
from proxy.context import RequestContext
from proxy.errors import Conflict, NotFound
from proxy.outcome import Outcome, Reply
from proxy.spending import without_our_fields
from proxy.upstream import Upstream

log = logging.getLogger("cachecade.learning")
KEEP_LABELS = 5000  # per scope, newest first: what the rule reads
SHORT_ANSWER_WORDS = 12  # answers this short are compared as text; longer ones by the meaning of their words
SAME_MEANING = 0.9  # cosine of two long answers' embeddings from which they say the same thing


@dataclass
class LearningStats:
    labels: dict[str, int] = field(default_factory=lambda: {"good": 0, "bad": 0})
    entries_deleted: int = 0
    changes: dict[str, int] = field(default_factory=lambda: {"tightened": 0, "loosened": 0})
    remember_errors: int = 0
    upstream_answers: int = 0  # requests the upstream answered (the base of shadow_max_share)
    shadow: dict[str, int] = field(default_factory=lambda: {"checks": 0, "agreed": 0, "disagreed": 0, "capped": 0,
                                                            "errors": 0, "tokens": 0})  # fmt: skip


class Learner:
    """Remembers what answered, takes feedback, and moves semantic thresholds to hold the operator's bound."""

    def __init__(self, cache: ResponseCache, served_ttl_s: float, publish: Callable[[CachePolicy], Awaitable[None]],
                 upstream: Upstream | None = None, seed: int | None = None) -> None:  # fmt: skip
        self.cache = cache
        self.served_ttl_s = served_ttl_s
        self.publish = publish
        self.upstream = upstream
        self.rng = random.Random(seed)
        self._day, self._day_tokens = "", 0
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

    def remember(self, ctx: RequestContext, outcome: Outcome) -> Served:
        """What answered; written in the background (the response never waits for it)."""
        if outcome.served_by.startswith("upstream:"):
            self.stats.upstream_answers += 1
        record = self.served(ctx, outcome)
        if self.served_ttl_s > 0 and ctx.request_id:
            task = asyncio.get_running_loop().create_task(self._remember(record))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return record

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

    # --- shadow checks -------------------------------------------------------------------------------------------

    def shadow_task(self, record: Served, ctx: RequestContext, kind: str, body: Mapping[str, Any], reply: Reply
                    ) -> BackgroundTask | None:  # fmt: skip
        """A check to run after the response is sent, for a sampled semantic hit or accepted local answer within
        the caps; None for the rest."""
        policy, outcome = self.cache.policy, reply.outcome
        checkable = outcome.cache == "HIT-SEMANTIC" or (outcome.served_by.startswith("local:") and
                                                        outcome.gate == "pass")  # fmt: skip
        if self.upstream is None or not checkable or policy.shadow_share <= 0 or not ctx.request_id:
            return None
        if self.rng.random() >= policy.shadow_share:
            return None
        checks = self.stats.shadow["checks"]
        today = time.strftime("%Y-%m-%d", time.gmtime())
        if today != self._day:
            self._day, self._day_tokens = today, 0
        if (checks + 1 > policy.shadow_max_share * (self.stats.upstream_answers + checks + 1)
                or self._day_tokens >= policy.shadow_daily_tokens):  # fmt: skip
            self.stats.shadow["capped"] += 1
            return None
        self.stats.shadow["checks"] += 1  # counted now: concurrent requests see the cap at once
        return BackgroundTask(self._shadow, record, kind, dict(body), reply.body, dict(ctx.headers))

    async def _shadow(self, record: Served, kind: str, body: dict[str, Any], served: dict[str, Any] | None,
                      headers: dict[str, str]) -> None:  # fmt: skip
        assert self.upstream is not None
        try:
            if served is None and record.entry_id is not None and (vid := vid_from_id(record.entry_id)) is not None:
                entry = await self.cache.store.get(vid)  # a streamed hit: its answer is the entry's
                served = entry.response if entry is not None else None
            cached = answer_text(served) if served is not None else None
            if cached is None or record.scope is None or record.score is None:
                return
            asked = {k: v for k, v in without_our_fields(body).items() if k not in ("stream", "stream_options")}
            path = "chat/completions" if kind == "chat" else "completions"
            fresh = await self.upstream.post(path, asked, self.upstream.headers(headers))
            usage = fresh.get("usage") if isinstance(fresh.get("usage"), Mapping) else {}
            spent = int(usage.get("total_tokens") or 0) if isinstance(usage, Mapping) else 0
            self.stats.shadow["tokens"] += spent
            self._day_tokens += spent
            good = await self.judge(cached, answer_text(fresh) or "")
        except Exception as exc:  # a background check: never an error anyone sees, but counted and logged
            self.stats.shadow["errors"] += 1
            log.warning("shadow check of request %s failed: %s", record.request_id, exc)
            return
        self.stats.shadow["agreed" if good else "disagreed"] += 1
        await self.cache.store.add_label(Label(record.scope, record.score, good, "shadow", time.time(),
                                               record.request_id), KEEP_LABELS)  # fmt: skip
        await self.reconsider(record.scope, record.namespace)

    async def judge(self, cached: str, fresh: str) -> bool:
        """Whether two answers to one question agree (short_answers_agree: short as text, long by meaning)."""
        short = short_answers_agree(cached, fresh)
        if short is not None:
            return short
        embedder = self.cache.embedder
        if embedder is None:
            return squad_normalise(cached) == squad_normalise(fresh)
        a, b = await embedder.embed(cached), await embedder.embed(fresh)
        if a is None or b is None:  # too long to embed: only the same text agrees
            return squad_normalise(cached) == squad_normalise(fresh)
        return float(np.dot(a, b)) >= SAME_MEANING

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
                          "changes": self.stats.changes, "remember_errors": self.stats.remember_errors,
                          "upstream_answers": self.stats.upstream_answers, "shadow": self.stats.shadow}}  # fmt: skip


def _namespace_threshold(policy: CachePolicy, scale: str, namespace: str) -> tuple[str, float]:
    """The policy field that holds a namespace's semantic threshold on this scale, and its value there."""
    if scale == "verifier":
        return "verifier_namespace_thresholds", policy.verifier_namespace_thresholds.get(
            namespace, policy.verifier_threshold
        )
    return "namespace_thresholds", policy.namespace_thresholds.get(namespace, policy.threshold)


def answer_text(response: Mapping[str, Any]) -> str | None:
    """The text of a chat or completion answer's first choice (None when it has none)."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return None
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, Mapping) else choices[0].get("text")
    return content if isinstance(content, str) else None


def short_answers_agree(cached: str, fresh: str) -> bool | None:
    """The judge for short answers (SQuAD-normalised: lower case, no punctuation or articles): the same words, or
    the shorter one's words inside the longer one ("Paris" and "The capital of France is Paris."). None when both
    are long (the embedder decides)."""
    a, b = squad_normalise(cached), squad_normalise(fresh)
    if min(len(a.split()), len(b.split())) > SHORT_ANSWER_WORDS:
        return None
    shorter, longer = sorted((a, b), key=len)
    return bool(shorter) and (shorter == longer or f" {shorter} " in f" {longer} ")
