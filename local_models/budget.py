"""Budget-aware decoding on local tiers: how many samples a budget affords, and a TALE-style budget hint.

With no budget a tier decodes as configured (k samples when `cascade_samples` sets k). With a budget, k shrinks
to what the budget pays for: greedy when it is tight, a majority vote of k samples when it allows k answers of
the estimated length with some margin. The samples share the budget, so a vote never spends more than it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Each voting sample is given at least this multiple of the estimated answer length.
VOTE_MARGIN = 1.5
# TALE (Han et al., 2024, "Token-Budget-Aware LLM Reasoning"): the budget stated after the question.
TALE_HINT = "Let's think step by step and use less than {budget} tokens:"


@dataclass(frozen=True)
class DecodingPlan:
    """How a tier decodes one request: `samples` answers (1 = a single answer), each at most `max_tokens`."""

    samples: int
    max_tokens: int


def plan_decoding(k_max: int, cap: int, budget: int | None, estimate: int | None) -> DecodingPlan:
    """The plan for a tier configured for up to `k_max` samples, given the answer cap, the tokens the request may
    spend (None: no budget) and the estimated answer length."""
    if budget is None:
        return DecodingPlan(k_max, cap)
    single = max(1, min(cap, budget))
    if k_max <= 1:
        return DecodingPlan(1, single)
    need = math.ceil(VOTE_MARGIN * max(estimate or single, 1))
    k = max(1, min(k_max, budget // need))
    return DecodingPlan(k, single if k == 1 else max(1, min(cap, budget // k)))


def with_hint(kind: str, body: Mapping[str, Any], budget: int) -> dict[str, Any]:
    """The request with the TALE hint after the last user turn (chat) or the prompt (completions)."""
    hint = TALE_HINT.format(budget=budget)
    out = dict(body)
    if kind != "chat":
        if isinstance(out.get("prompt"), str):
            out["prompt"] = f"{out['prompt']}\n{hint}"
        return out
    messages = [dict(m) if isinstance(m, Mapping) else m for m in out.get("messages") or []]
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = f"{content}\n{hint}"
            elif isinstance(content, list):
                message["content"] = [*content, {"type": "text", "text": hint}]
            break
    out["messages"] = messages
    return out
