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

- **Escalations**: when a local gate rejected an answer as not confident enough and the upstream answered, the
  two answers are compared by the same judge (every such answer, after the response): a label for that tier's
  gate, at the rejected answer's score. Every label on a local answer also tells the router (proxy/router.py)
  whether that answer was right.
- **Local gates** move like semantic thresholds, per namespace, within the same error target
  (`CascadePolicy.namespace_thresholds`, shared like an admin change).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from starlette.background import BackgroundTask, BackgroundTasks

from cache.errors import CacheError
from cache.labels import Decision, Label, Served, decide, scope
from cache.policy import CachePolicy
from cache.response_cache import ResponseCache
from cache.store import vid_from_id
from local_models.cascade import CascadePolicy
from local_models.confidence import squad_normalise
from proxy.context import RequestContext
from proxy.errors import Conflict, NotFound
from proxy.logs import Throttle
from proxy.outcome import Outcome, Reply
from proxy.router import Router
from proxy.spending import without_our_fields
from proxy.upstream import Upstream

log = logging.getLogger("cachecade.learning")
KEEP_LABELS = 5000  # per scope, newest first: what the rule reads
SHORT_ANSWER_WORDS = 12  # answers this short are compared as text; longer ones by the meaning of their words
SAME_MEANING = 0.9  # cosine of two long answers' embeddings from which they say the same thing


class CascadeHolder(Protocol):
    """What learning needs of the cascade (proxy.cascade.Cascade): its policy and its router."""

    policy: CascadePolicy
    router: Router | None


@dataclass
class LearningStats:
    labels: dict[str, int] = field(default_factory=lambda: {"good": 0, "bad": 0})
    entries_deleted: int = 0
    changes: dict[str, int] = field(default_factory=lambda: {"tightened": 0, "loosened": 0})
    remember_errors: int = 0
    upstream_answers: int = 0  # requests the upstream answered (the base of shadow_max_share)
    escalations: dict[str, int] = field(default_factory=lambda: {"compared": 0, "agreed": 0, "disagreed": 0,
                                                                 "errors": 0})  # fmt: skip
    shadow: dict[str, int] = field(default_factory=lambda: {"checks": 0, "agreed": 0, "disagreed": 0, "capped": 0,
                                                            "errors": 0, "tokens": 0})  # fmt: skip


class Learner:
    """Remembers what answered, takes feedback, and moves semantic thresholds to hold the operator's bound."""

    def __init__(self, cache: ResponseCache, served_ttl_s: float,
                 publish: Callable[[str, CachePolicy | CascadePolicy], Awaitable[None]],
                 upstream: Upstream | None = None, seed: int | None = None,
                 cascade: CascadeHolder | None = None) -> None:  # fmt: skip
        self.cache = cache
        self.cascade = cascade  # whose gate thresholds local labels move, and whose router they teach
        self.served_ttl_s = served_ttl_s
        self.publish = publish
        self.upstream = upstream
        self.rng = random.Random(seed)
        self._day, self._day_tokens = "", 0
        self.floor = cache.policy.model_copy(deep=True)  # the thresholds configured at start: never looser
        self.stats = LearningStats()
        self._remember_failed = Throttle()
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
            self._remember_failed.warning(log, "could not remember request %s for feedback: %s", record.request_id, exc)

    async def drain(self) -> None:
        """Wait for the records being written (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # --- after the response: shadow checks and escalation comparisons ---------------------------------------------

    def after(self, record: Served, ctx: RequestContext, kind: str, body: Mapping[str, Any], reply: Reply
              ) -> BackgroundTasks | None:  # fmt: skip
        """What to learn once the response has been sent: a shadow check (sampled, within the caps) and the
        comparison of an escalated request's upstream answer with the local answers the gate rejected."""
        tasks = [t for t in (self.shadow_task(record, ctx, kind, body, reply), self.escalation_task(record, reply))
                 if t is not None]  # fmt: skip
        return BackgroundTasks(tasks) if tasks else None

    def escalation_task(self, record: Served, reply: Reply) -> BackgroundTask | None:
        """For a request the upstream answered after a local gate rejected an answer as not confident enough:
        compare the two (every such answer, not a sample). A streamed upstream answer is not compared (its text is
        only known once the stream has ended)."""
        outcome = reply.outcome
        if not outcome.rejected or not outcome.served_by.startswith("upstream:") or reply.body is None:
            return None
        fresh = answer_text(reply.body)
        return None if fresh is None else BackgroundTask(self._compare, record, list(outcome.rejected), fresh)

    async def _compare(self, record: Served, rejected: list[tuple[str, float, str]], fresh: str) -> None:
        for tier, score, text in rejected:
            try:
                good = await self.judge(text, fresh)
                self.stats.escalations["compared"] += 1
                self.stats.escalations["agreed" if good else "disagreed"] += 1
                the_scope = scope(f"local:{tier}", "confidence", record.namespace)
                await self.cache.store.add_label(Label(the_scope, score, good, "escalation", time.time(),
                                                       record.request_id), KEEP_LABELS)  # fmt: skip
                self._teach_router(the_scope, record.request_id, good)
                await self.reconsider(the_scope, record.namespace)
            except Exception as exc:  # a background comparison: counted and logged, never seen by a client
                self.stats.escalations["errors"] += 1
                log.warning("comparing the escalated answer of request %s failed: %s", record.request_id, exc)

    def _teach_router(self, the_scope: str, request_id: str, good: bool) -> None:
        """A label on a local tier's answer tells the router whether that answer was right."""
        tier = the_scope.split("/", 1)[0]
        router = self.cascade.router if self.cascade is not None else None
        if router is not None and tier.startswith("local:"):
            router.label(tier.removeprefix("local:"), request_id, good)

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
        self._teach_router(record.scope, record.request_id, good)
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
            self._teach_router(record.scope, request_id, good)
            decision = await self.reconsider(record.scope, record.namespace)
            if decision is not None:
                out["threshold"] = decision.summary()
        return out

    # --- thresholds ----------------------------------------------------------------------------------------------

    async def reconsider(self, the_scope: str, namespace: str) -> Decision | None:
        """Run the rule on a scope's labels and apply its threshold: a semantic threshold in the cache policy, a
        local tier's gate in the cascade policy (None: no error target in this namespace, or not a learning
        scope). A semantic threshold never loosens below the one configured at start; a local gate may, to a
        certified score (every answer it rejected on an escalated request is compared: a census, not a sample)."""
        policy = self.cache.policy
        delta = policy.max_error_for(namespace)
        tier, scale = the_scope.split("/", 2)[:2]
        if delta is None:
            return None
        if tier == "semantic":
            field_name, current = _namespace_threshold(policy, scale, namespace)
            floor = min(_namespace_threshold(self.floor, scale, namespace)[1], current)
        elif tier.startswith("local:") and self.cascade is not None:
            field_name, floor = tier.removeprefix("local:"), 0.0
            current = self.cascade.policy.threshold_for(field_name, namespace)
        else:
            return None
        labels = await self.cache.store.labels(the_scope, KEEP_LABELS)
        decision = decide(labels, current, delta, floor=floor, min_labels=policy.learn_min_labels,
                          confidence=policy.learn_confidence)  # fmt: skip
        self.decisions[the_scope] = decision
        if decision.threshold == current:
            return decision
        self.stats.changes[decision.reason] += 1
        log.warning("learning %s the %s threshold (%s) of namespace %r: %.4f -> %.4f (%d labels at it, %d wrong, "
                    "error bound %.4f, target %.4f)", decision.reason, tier, scale, namespace, current,
                    decision.threshold, decision.labels, decision.errors, decision.bound, delta)  # fmt: skip
        if tier == "semantic":
            changed = {**getattr(policy, field_name), namespace: decision.threshold}
            self.cache.policy = policy.model_copy(update={field_name: changed})
            await self.publish("cache", self.cache.policy)
        elif self.cascade is not None:
            cascade = self.cascade.policy
            gates = {**cascade.namespace_thresholds.get(namespace, {}), field_name: decision.threshold}
            learnt = {**cascade.namespace_thresholds, namespace: gates}
            self.cascade.policy = cascade.model_copy(update={"namespace_thresholds": learnt})
            await self.publish("cascade", self.cascade.policy)
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
                          "upstream_answers": self.stats.upstream_answers, "shadow": self.stats.shadow,
                          "escalations": self.stats.escalations}}  # fmt: skip


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
    """The judge for short answers (SQuAD-normalised: lower case, no punctuation or articles): the same words (in
    any order: "The capital of France is Paris." and "Paris is the capital of France."), or the shorter one's words
    inside the longer one ("Paris" and "The capital of France is Paris."). None when both are long (the embedder
    decides). Same words in another order can say another thing ("A beat B"); short answers rarely do."""
    a, b = squad_normalise(cached), squad_normalise(fresh)
    if min(len(a.split()), len(b.split())) > SHORT_ANSWER_WORDS:
        return None
    shorter, longer = sorted((a, b), key=len)
    return bool(shorter) and (sorted(a.split()) == sorted(b.split()) or f" {shorter} " in f" {longer} ")
