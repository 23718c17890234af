"""What a cache miss may spend, decided before any model runs: the estimated answer length, the answer cap
(client's max_tokens, per-request budget, the key's remaining budget, the clamp), the reservation against the
key's budget, and the TALE hint. Also the token accounting of what was spent.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cache.errors import CacheError
from cache.keys import CacheKey, Kind
from cache.response_cache import ResponseCache
from local_models.budget import with_hint
from proxy.budget import BudgetPolicy, Budgets, Ticket
from proxy.errors import InvalidRequest
from proxy.estimate import Estimate, from_neighbours, from_prompt
from proxy.tokens import TokenCounter

NEIGHBOURS = 8  # stored answers consulted for an estimate
MIN_NEIGHBOUR_SIMILARITY = 0.5  # farther ones say little about this answer's length


@dataclass(frozen=True)
class Spend:
    """One miss's token plan."""

    ticket: Ticket
    estimate: Estimate
    prompt_tokens: int  # estimated before the call (cl100k_base)
    cap: int | None  # completion cap for every tier (None: the client set none and nothing else caps it)
    budget: int | None  # what a local tier may spend on its answers (per-request budget, key's room)
    hinted: bool  # the prompt states the budget (TALE)

    def headers(self) -> dict[str, str]:
        """x-token-cap (the estimate's headers are set before the plan, so that a 429 carries them too)."""
        return {} if self.cap is None else {"x-token-cap": str(self.cap)}


@dataclass
class TokenStats:
    """Tokens since start, kept apart by who produced them (cache savings are in the cache's stats)."""

    local_prompt: int = 0  # of answers served by local tiers
    local_completion: int = 0
    local_spent: int = 0  # every local token, escalated attempts and extra samples included
    upstream_prompt: int = 0  # as the upstream reported them
    upstream_completion: int = 0
    upstream_unreported: int = 0  # upstream answers without usage (counted with our estimate instead)
    clamped: int = 0  # requests whose answer cap was lowered below what the client asked

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def without_our_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """A request body as a model sees it: cachecade's own fields (`cache`, `token_budget`) removed."""
    return {k: v for k, v in body.items() if k not in ("cache", "token_budget")}


def upstream_usage(payload: Mapping[str, Any], counter: TokenCounter, prompt_estimate: int) -> tuple[int, int, bool]:
    """(prompt, completion, reported) of an upstream answer: its `usage`, else our count of its text."""
    usage = payload.get("usage")
    if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
        return int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"]), True
    text = ""
    for choice in payload.get("choices") or []:
        if isinstance(choice, Mapping):
            message = choice.get("message") or {}
            content = message.get("content") if isinstance(message, Mapping) else None
            text += content if isinstance(content, str) else str(choice.get("text") or "")
    return prompt_estimate, counter.count(text), False


class SpendPlanner:
    """Makes the Spend of each miss and applies it to the request body."""

    def __init__(self, budgets: Budgets, counter: TokenCounter, cache: ResponseCache,
                 max_prompt_tokens: int | None = None) -> None:  # fmt: skip
        self.budgets = budgets
        self.counter = counter
        self.cache = cache
        self.max_prompt_tokens = max_prompt_tokens  # longer prompts are a 400 (None: no limit)
        self.stats = TokenStats()

    @property
    def policy(self) -> BudgetPolicy:
        return self.budgets.policy

    async def estimate(self, key: CacheKey, vector: np.ndarray | None) -> Estimate:
        """From the nearest stored answers when there are some, else from the prompt."""
        if vector is not None:
            try:
                found = await self.cache.neighbours(key, vector, NEIGHBOURS, MIN_NEIGHBOUR_SIMILARITY)
            except CacheError:  # fail open: the store is down, the prompt guess stands in
                found = []
            estimate = from_neighbours(found)
            if estimate is not None:
                return estimate
        return from_prompt(key.text)

    async def plan(
        self, kind: Kind, body: Mapping[str, Any], model: str, client_cap: int | None, request_budget: int | None,
        ticket: Ticket, estimate: Estimate,
    ) -> Spend:  # fmt: skip
        """Cap and reserve (429 when the key's budget cannot pay for the prompt and one token; 400 when the prompt
        is over max_prompt_tokens). Tokens are counted off the event loop: a long prompt must not stall others."""
        prompt = await asyncio.to_thread(self.counter.prompt_tokens, kind, body)
        if self.max_prompt_tokens is not None and prompt > self.max_prompt_tokens:
            raise InvalidRequest(f"the prompt has about {prompt} tokens, over this proxy's limit of "
                                 f"{self.max_prompt_tokens} (CACHECADE_MAX_PROMPT_TOKENS)",
                                 param="messages" if kind == "chat" else "prompt",
                                 code="context_length_exceeded")  # fmt: skip
        caps = [client_cap, request_budget]
        if self.policy.clamp_factor is not None:
            caps.append(max(self.policy.clamp_min_tokens, math.ceil(self.policy.clamp_factor * estimate.tokens)))
        remaining, room = ticket.remaining_tokens, None
        if remaining is not None:
            room = max(0, remaining - prompt)
            caps.append(room)
            if client_cap is None and request_budget is None:
                caps.append(self.policy.default_max_tokens)
        cap = min((c for c in caps if c is not None), default=None)
        if remaining is not None:
            await self.budgets.reserve(ticket, prompt + max(1, cap or 1))
        if cap is not None and client_cap is not None and cap < client_cap:
            self.stats.clamped += 1
        budget = min((b for b in (request_budget, room) if b is not None), default=None)
        hinted = model in self.policy.hint_routes
        return Spend(ticket, estimate, prompt, cap, budget, hinted)

    def apply(self, kind: Kind, body: Mapping[str, Any], spend: Spend) -> dict[str, Any]:
        """The body a model sees: our fields removed, the cap set when it is below the client's, the hint."""
        out = without_our_fields(body)
        if spend.cap is not None:
            field = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in out else "max_tokens"
            out[field] = spend.cap
        if spend.hinted:
            out = with_hint(kind, out, spend.cap or spend.estimate.tokens)
        return out

    async def settle(self, spend: Spend, spent: int) -> None:
        """Replace the key's reservation by what the served answer cost."""
        await self.budgets.settle(spend.ticket, spent)
