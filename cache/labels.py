"""Labels from traffic, and thresholds that hold an error bound.

What answered each request is remembered for a while (`Served`, keyed by the API key's id and the request id), so that a
client's feedback can find it. A label says whether an answer served at some score was right (`Label`): the
score is what the tier's threshold is compared with (the verifier's probability, or the cosine with the
verifier off). Labels live in the entry store (SQLite embedded, Redis shared), so every replica learns from all.

The rule that moves a threshold (`decide`), per scope (tier, score scale, namespace), for a target error rate delta:
- a threshold t is *certified* when the labels of answers scored >= t number at least `min_labels` and the
  one-sided Clopper-Pearson upper bound of their error rate, at `confidence`, is <= delta;
- **tighten at once**: when the labels at the current t hold an error and their upper bound exceeds delta, t moves
  up to the lowest threshold above it that is certified, or above which no labelled answer was wrong, whichever
  is lower (past the offending scores, never further than the labels ask);
- **loosen only when certified**: t moves down to the lowest labelled score below it that is certified, never
  below `floor` (and never below the lowest label: nothing is known there).
  Labels below the current threshold come from feedback on answers served before a tightening; with none, it
  never loosens.

The guarantee, where labels are a random sample of what the threshold serves: at a certified threshold, the
error rate of the answers it serves is <= delta with probability >= `confidence`. Client feedback is not a random
sample (people report bad answers more than good ones), so it makes the rule stricter, never looser, than that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy.special import betaincinv  # the Beta quantile alone: scipy.stats would add ~50 MB and 0.5 s to the start

Source = Literal["feedback", "shadow", "escalation"]


@dataclass(frozen=True)
class Served:
    """What answered one request: kept for `served_ttl_s` so feedback can label it."""

    request_id: str
    key_id: str  # the caller's API key id: only the same key can label it
    namespace: str
    model: str
    tier: str  # exact | semantic | local:<name> | upstream
    entry_id: str | None  # the cache entry served (a hit) or stored (a miss)
    scope: str | None  # the threshold that decided it (see scope()), None when no threshold did
    score: float | None  # what that threshold was compared with
    at: float

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Served:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class Label:
    """Whether an answer served at `score` under the threshold of `scope` was right."""

    scope: str
    score: float
    good: bool
    source: Source
    at: float
    request_id: str = ""

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> Label:
        return cls(**json.loads(raw))


def scope(tier: str, scale: str, namespace: str) -> str:
    """The threshold a label counts against: `semantic/verifier/<namespace>`, `semantic/cosine/<namespace>`,
    `local:<model>/confidence/<namespace>`."""
    return f"{tier}/{scale}/{namespace}"


def upper_bounds(errors: np.ndarray, n: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds of error rates from `errors` wrong out of `n` (1.0 with no labels, or
    all of them wrong)."""
    errors, n = np.asarray(errors), np.asarray(n)
    out = np.ones(len(n))
    some = (n > 0) & (errors < n)
    out[some] = betaincinv(errors[some] + 1, n[some] - errors[some], confidence)  # Beta(k+1, n-k) quantile
    return out


def upper_bound(errors: int, n: int, confidence: float) -> float:
    """upper_bounds for one count."""
    return float(upper_bounds(np.array([errors]), np.array([n]), confidence)[0])


@dataclass(frozen=True)
class Decision:
    """What the labels say about a scope's threshold: the one to use, and the figures behind it."""

    threshold: float
    previous: float
    labels: int  # labels of answers scored >= threshold
    errors: int
    bound: float  # upper bound of the error rate at `threshold`
    reason: Literal["kept", "tightened", "loosened"]

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def decide(labels: list[Label], current: float, delta: float, *, floor: float, ceiling: float = 1.0,
           min_labels: int = 30, confidence: float = 0.95) -> Decision:  # fmt: skip
    """The threshold the labels ask for (the rule in the module's docstring). Vectorised: a few milliseconds for
    the 5,000 labels a scope keeps."""
    scores = np.sort(np.array([label.score for label in labels], dtype=np.float64))
    bad = np.array([not label.good for label in sorted(labels, key=lambda label: label.score)], dtype=np.int64)
    wrong_from = np.concatenate([np.cumsum(bad[::-1])[::-1], [0]])  # wrong answers among scores[i:]

    def at(thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, wrong ones) of the answers scored >= each threshold."""
        first = np.searchsorted(scores, thresholds, side="left")
        return len(scores) - first, wrong_from[first]

    def decision(t: float, reason: Literal["kept", "tightened", "loosened"]) -> Decision:
        (n,), (k,) = at(np.array([t]))
        return Decision(t, current, int(n), int(k), upper_bound(int(k), int(n), confidence), reason)

    n_now, k_now = (int(x[0]) for x in at(np.array([current])))
    if k_now and upper_bound(k_now, n_now, confidence) > delta:
        # Candidates above: at each labelled score (includes it) and just above it (excludes it), in range.
        grid = np.unique(np.clip(np.concatenate([scores, np.nextafter(scores, np.inf)]), floor, ceiling))
        grid = grid[grid > current]
        n, k = at(grid)
        clean = grid[k == 0]
        certified = grid[(n >= min_labels) & (upper_bounds(k, n, confidence) <= delta)] if len(grid) else grid
        chosen = min(float(clean[0]) if len(clean) else ceiling, float(certified[0]) if len(certified) else ceiling)
        return decision(chosen, "tightened")
    # Loosening goes only as low as a labelled score: below the lowest label nothing is known.
    lower = np.unique(scores[(scores >= floor) & (scores < current)])
    if len(lower):
        n, k = at(lower)
        ok = lower[(n >= min_labels) & (upper_bounds(k, n, confidence) <= delta)]
        if len(ok):
            return decision(float(ok[0]), "loosened")
    return decision(current, "kept")
