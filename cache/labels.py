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
import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

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


def upper_bound(errors: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of an error rate from `errors` wrong out of `n` (1.0 with none)."""
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, errors + 1, n - errors))


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
    """The threshold the labels ask for (the rule in the module's docstring)."""
    ranked = sorted(labels, key=lambda label: -label.score)

    def at(t: float) -> tuple[int, int]:
        chosen = [label for label in ranked if label.score >= t]
        return len(chosen), sum(not label.good for label in chosen)

    def certified(t: float) -> bool:
        n, k = at(t)
        return n >= min_labels and upper_bound(k, n, confidence) <= delta

    # Candidate thresholds: just above each labelled score (excludes it) and at it (includes it), in range.
    grid = sorted({min(ceiling, max(floor, s)) for label in ranked for s in (label.score, _above(label.score))}
                  | {current, floor})  # fmt: skip
    n, k = at(current)
    bound = upper_bound(k, n, confidence)
    if k and bound > delta:
        above = [t for t in grid if t > current]
        clean = next((t for t in above if at(t)[1] == 0), ceiling)
        safe = next((t for t in above if certified(t)), ceiling)
        chosen = min(clean, safe)
        n, k = at(chosen)
        return Decision(chosen, current, n, k, upper_bound(k, n, confidence), "tightened")
    # Loosening goes only as low as a labelled score: below the lowest label nothing is known.
    lower = next((t for t in sorted({label.score for label in ranked}) if floor <= t < current and certified(t)),
                 None)  # fmt: skip
    if lower is not None:
        n, k = at(lower)
        return Decision(lower, current, n, k, upper_bound(k, n, confidence), "loosened")
    return Decision(current, current, n, k, bound, "kept")


def _above(score: float) -> float:
    """The next threshold above a score (one that no longer serves it)."""
    return math.nextafter(score, math.inf)


SHORT_ANSWER_WORDS = 12  # answers this short are compared as text; longer ones by the meaning of their words
SAME_MEANING = 0.9  # cosine of two long answers' embeddings from which they say the same thing
_NOT_WORD = re.compile(r"[^\w\s]")


def normalised(text: str) -> str:
    """An answer's words: lower case, punctuation dropped, spacing collapsed."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def short_answers_agree(cached: str, fresh: str) -> bool | None:
    """The judge for short answers: the same words, or the shorter one's words inside the longer one ("Paris" and
    "The capital of France is Paris."). None when both are long (the embedder decides)."""
    a, b = normalised(cached), normalised(fresh)
    if min(len(a.split()), len(b.split())) > SHORT_ANSWER_WORDS:
        return None
    shorter, longer = sorted((a, b), key=len)
    return bool(shorter) and (shorter == longer or f" {shorter} " in f" {longer} ")
