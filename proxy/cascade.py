"""The cascade on a cache miss: local tiers in route order, each gated on its confidence, then the upstream.

No FastAPI here: the pipeline calls `Cascade.run` and renders what it returns.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cache.keys import Kind
from local_models.budget import plan_decoding
from local_models.cascade import CascadePolicy, Tier, judge
from local_models.confidence import Confidence, assess, vote, vote_decided
from local_models.engine import Generation, Sampling
from local_models.errors import LocalModelError, TierOff, Unsupported
from local_models.worker import ModelWorker
from proxy.router import Router

log = logging.getLogger("cachecade.cascade")
VOTE_TEMPERATURE = 0.7  # samples after the first, when a tier votes and the caller asked for greedy


@dataclass(frozen=True)
class LocalAnswer:
    """A local tier's answer: accepted by the gate, or forced (the last tier, nothing to escalate to)."""

    tier: str
    generation: Generation
    confidence: Confidence
    gated: bool

    def response(self, kind: Kind) -> dict[str, Any]:
        """The answer in OpenAI's response shape."""
        g = self.generation
        text = g.text.strip()
        usage = {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                 "total_tokens": g.prompt_tokens + g.completion_tokens}  # fmt: skip
        head = {"created": int(time.time()), "model": self.tier, "system_fingerprint": f"cachecade-local-{self.tier}"}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": g.finish_reason}  # fmt: skip
            return {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", **head, "choices": [choice],
                    "usage": usage}  # fmt: skip
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": g.finish_reason}
        return {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", **head, "choices": [choice],
                "usage": usage}  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """What a request may spend on one tier's answer (None: no budget) and its estimated answer length."""

    tokens: int | None = None
    estimate: int | None = None


@dataclass
class CascadeResult:
    """What the local tiers did: an answer to serve, or where to escalate."""

    answer: LocalAnswer | None = None
    tried: list[str] = field(default_factory=list)  # "smollm2:low-confidence", ...
    upstream: Tier | None = None  # the next tier when no local answer is served
    error: LocalModelError | None = None  # the last local failure, when nothing answered
    rejected: list[LocalAnswer] = field(default_factory=list)  # answers the gate found not confident enough
    local_seconds: float = 0.0  # time the local models spent generating (the rest of a run is overhead)
    local_tokens: int = 0  # tokens the local models spent (every sample of every tier tried)


@dataclass
class CascadeStats:
    """Counters since start: answers served per local tier, escalations per tier and reason."""

    served: Counter[str] = field(default_factory=Counter)
    escalated: Counter[str] = field(default_factory=Counter)
    upstream: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"served_local": dict(self.served), "escalations": dict(self.escalated), "escalated_upstream":
                self.upstream}  # fmt: skip


def local_unsupported(body: Mapping[str, Any]) -> str | None:
    """What in a request a local tier cannot honour (it would answer, but not as asked), or None."""
    if body.get("tools") or body.get("functions"):
        return "tools"
    if body.get("n") not in (None, 1):
        return "n"
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") or body.get("echo"):
        return "logprobs"
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") not in (None, "text"):
        return "response_format"
    return None


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if isinstance(stop, str):
        return (stop,)
    return tuple(s for s in stop if isinstance(s, str)) if isinstance(stop, list) else ()


class Cascade:
    """Runs a request through its route's local tiers."""

    def __init__(self, workers: Mapping[str, ModelWorker], policy: CascadePolicy,
                 off: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.workers = dict(workers)
        self._off_at_start = dict(off or {})  # configured models that failed their self-check: name -> why
        self.policy = policy
        self.stats = CascadeStats()
        self.router: Router | None = None  # skips tiers that similar queries showed will fail (proxy/router.py)

    @property
    def models(self) -> set[str]:
        """Every configured local model a route may name: serving, or off (its tier then escalates)."""
        return set(self.workers) | set(self._off_at_start)

    @property
    def off(self) -> dict[str, str]:
        """Models that do not run, and why: failed the start-up self-check, or crashed too often since."""
        later = {name: w.off_reason for name, w in self.workers.items() if w.off_reason is not None}
        return {**self._off_at_start, **later}

    @property
    def serving(self) -> list[str]:
        """Local models that answer."""
        return sorted(name for name, w in self.workers.items() if w.off_reason is None)

    def route(self, model: str, has_upstream: bool) -> list[Tier] | None:
        return self.policy.route_for(model, has_upstream)

    def samplings(self, tier: str, body: Mapping[str, Any], limit: int | None, budget: Budget | None = None
                  ) -> list[Sampling]:  # fmt: skip
        """One Sampling per sample: greedy unless the caller set a temperature; k > 1 adds varied samples. A
        budget caps each sample and lowers k to what it pays for (local_models.budget)."""
        temperature = body.get("temperature")
        temperature = float(temperature) if isinstance(temperature, int | float) else 0.0
        top_p = body.get("top_p")
        given = body.get("seed")
        seed = given if isinstance(given, int) else 0
        budget = budget or Budget()
        plan = plan_decoding(self.policy.samples.get(tier, 1), limit or self.policy.max_tokens, budget.tokens,
                             budget.estimate)  # fmt: skip
        base = Sampling(max_tokens=plan.max_tokens, temperature=temperature,
                        top_p=float(top_p) if isinstance(top_p, int | float) else 1.0, stop=_stop(body),
                        seed=seed)  # fmt: skip
        varied = max(temperature, VOTE_TEMPERATURE)
        return [base] + [Sampling(base.max_tokens, varied, base.top_p, base.stop, seed + i)
                         for i in range(1, plan.samples)]  # fmt: skip

    async def run(self, kind: Kind, body: Mapping[str, Any], route: list[Tier], limit: int | None,
                  budget: Budget | None = None, vector: np.ndarray | None = None, namespace: str = "",
                  request_id: str = "") -> CascadeResult:  # fmt: skip
        """Try each local tier in order until one is accepted; the last local tier is forced to answer when no
        upstream follows it. With the query's embedding, the router may skip a tier (never the last). Gate
        thresholds are the namespace's (learnt from traffic there, else configured)."""
        result = CascadeResult()
        for position, tier in enumerate(route):
            if not tier.local:
                result.upstream = tier
                self.stats.upstream += 1
                return result
            last = position == len(route) - 1
            threshold = self.policy.threshold_for(tier.name, namespace)
            if self.router is not None and not last and self.router.skip(tier.name, threshold, vector):
                self._escalate(tier.name, "skipped-by-router", result)
                continue
            samplings = self.samplings(tier.name, body, limit, budget)
            answer = await self._try(tier.name, kind, body, samplings, last, result, threshold, (vector, request_id))
            if answer is not None:
                result.answer = answer
                self.stats.served[tier.name] += 1
                return result
        return result

    async def _try(self, name: str, kind: Kind, body: Mapping[str, Any], samplings: list[Sampling], last: bool,
                   result: CascadeResult, threshold: float, query: tuple[np.ndarray | None, str] = (None, "")
                   ) -> LocalAnswer | None:  # fmt: skip
        """One tier's answer, judged by its gate at `threshold`; `query` (its embedding, the request id) teaches
        the router."""
        worker = self.workers.get(name)
        try:
            if worker is None or worker.off_reason is not None:
                raise TierOff(f"local model {name} is off: {self.off.get(name, 'not loaded')}")
            unsupported = local_unsupported(body)
            if unsupported is not None:
                raise Unsupported(f"{name} cannot honour {unsupported}")
            prompt = worker.prompt(kind, body)
            enough = (lambda gens: vote_decided([g.text for g in gens], len(samplings))) if len(samplings) > 1 else None
            generations = await worker.generate(prompt, samplings, enough)
            result.local_seconds += sum(g.seconds for g in generations)
            result.local_tokens += sum(g.prompt_tokens + g.completion_tokens for g in generations)
        except LocalModelError as exc:
            self._escalate(name, exc.reason, result)
            result.error = exc
            return None
        answer = self._assess(name, generations, len(samplings))
        verdict = judge(answer.generation, answer.confidence, threshold, self.policy.min_token_prob.get(name, 0.0))
        complete = verdict.accepted or verdict.reason == "low-confidence"  # else cut off or degenerate
        vector, request_id = query
        if self.router is not None and vector is not None:  # every answer teaches the router
            self.router.record(name, vector, answer.confidence.score, complete, request_id)
        if verdict.accepted:
            return answer
        ungated = replace(answer, gated=False)
        if verdict.reason == "low-confidence":  # the upstream's answer will say whether it was right after all
            result.rejected.append(ungated)
        if last:  # nothing to escalate to: the last local tier answers, marked as not gated (and never cached)
            return ungated
        self._escalate(name, verdict.reason or "rejected", result)
        return None

    def _escalate(self, name: str, reason: str, result: CascadeResult) -> None:
        result.tried.append(f"{name}:{reason}")
        self.stats.escalated[f"{name}:{reason}"] += 1

    @staticmethod
    def _assess(name: str, generations: list[Generation], planned: int) -> LocalAnswer:
        if len(generations) == 1:
            return LocalAnswer(name, generations[0], assess(generations[0]), True)
        # Agreement over the planned samples: an early stop counts the untaken ones as dissent (a lower bound).
        index, agreement = vote([g.text for g in generations], planned)
        chosen = generations[index]
        single = assess(chosen)
        confidence = Confidence(single.mean_logprob, single.min_logprob, single.degenerate, agreement,
                                len(generations))  # fmt: skip
        return LocalAnswer(name, chosen, confidence, True)
