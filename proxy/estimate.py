"""How many completion tokens a request's answer will need, estimated before any model runs.

First choice: the lengths of the answers the cache holds for the query's nearest semantic neighbours (same
tenant, model and context), weighted by similarity. The cache knows what similar questions cost; no peer uses
that. Without neighbours, a rough prompt-based guess (`from_prompt`, constants below) stands in; it is a
fallback, not a model, and the header says which source was used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from cache.response_cache import Neighbour

# The fallback's three classes (tokens): a short factual answer, a worked answer, a long-form text.
SHORT_ANSWER, WORKED_ANSWER, LONG_ANSWER = 48, 192, 384
_LONG_FORM = re.compile(
    r"\b(explain|describe|write|essay|story|list|compare|implement|code|summari[sz]e|translate)\b", re.I
)
_WORKED = re.compile(r"\b(how many|how much|calculate|compute|solve|step by step|total|prove|why)\b|\d", re.I)


@dataclass(frozen=True)
class Estimate:
    """Estimated completion tokens and where the figure came from."""

    tokens: int
    source: Literal["neighbours", "prompt"]
    neighbours: int = 0

    def headers(self) -> dict[str, str]:
        source = f"neighbours;n={self.neighbours}" if self.source == "neighbours" else "prompt"
        return {"x-token-estimate": str(self.tokens), "x-token-estimate-source": source}


def weighted_quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The q-quantile of values with weights (the smallest value whose cumulative weight reaches q)."""
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= q * total:
            return value
    return pairs[-1][0]


def from_neighbours(neighbours: Sequence[Neighbour], q: float = 0.5) -> Estimate | None:
    """The similarity-weighted median length of the neighbours' answers (None without neighbours)."""
    if not neighbours:
        return None
    lengths = [float(n.completion_tokens) for n in neighbours]
    tokens = weighted_quantile(lengths, [n.similarity for n in neighbours], q)
    return Estimate(max(1, round(tokens)), "neighbours", len(neighbours))


def from_prompt(text: str | None) -> Estimate:
    """A rough class of answer from the prompt's wording: long-form requests, worked problems, short answers."""
    text = text or ""
    if _LONG_FORM.search(text):
        return Estimate(LONG_ANSWER, "prompt")
    return Estimate(WORKED_ANSWER if _WORKED.search(text) else SHORT_ANSWER, "prompt")
