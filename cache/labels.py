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
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

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
    out[some] = beta_quantile(errors[some] + 1.0, (n[some] - errors[some]).astype(float), confidence)
    return out


def beta_quantile(a: np.ndarray, b: np.ndarray, p: float, rtol: float = 1e-12) -> np.ndarray:
    """The `p` quantile of Beta(a, b), elementwise: Newton's method on the regularised incomplete beta, kept inside
    a bracket that bisection takes over whenever a step would leave it. (Written here rather than taken from
    SciPy, whose 140 MB were this module's only use of it, so that the sidecar image stays small;
    tests/cache/test_labels.py checks it against scipy.special.betaincinv.)"""
    a, b = np.asarray(a, float), np.asarray(b, float)
    low, high = np.zeros(len(a)), np.ones(len(a))
    log_norm = _log_norm(a, b)  # symmetric in a and b: made once, for every step and either side of the mirror
    # Start at the normal approximation's quantile: Newton then needs a handful of steps even for large counts.
    mean, sd = a / (a + b), np.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    x = np.clip(mean + NormalDist().inv_cdf(p) * sd, 1e-300, 1 - 1e-16)
    todo = np.arange(len(a))  # the elements still moving: the others are left alone
    for _ in range(200):
        aa, bb, xx = a[todo], b[todo], x[todo]
        f = incomplete_beta(aa, bb, xx, log_norm[todo]) - p
        lo, hi = np.where(f < 0, xx, low[todo]), np.where(f < 0, high[todo], xx)
        low[todo], high[todo] = lo, hi
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            step = xx - f / np.exp(log_norm[todo] + (aa - 1) * np.log(xx) + (bb - 1) * np.log1p(-xx))
        step = np.where(np.isfinite(step) & (step > lo) & (step < hi), step, (lo + hi) / 2)
        x[todo] = step
        todo = todo[np.abs(step - xx) > rtol * xx]
        if not len(todo):
            break
    return x


def _log_norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """-log B(a, b), elementwise."""
    lgamma = np.vectorize(math.lgamma, otypes=[float])
    return np.asarray(lgamma(a + b) - lgamma(a) - lgamma(b))


def incomplete_beta(a: np.ndarray, b: np.ndarray, x: np.ndarray, log_norm: np.ndarray | None = None) -> np.ndarray:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1, elementwise: its
    continued fraction (modified Lentz), evaluated where it converges fast and mirrored (1 - I_{1-x}(b, a))
    elsewhere. `log_norm`: -log B(a, b), when the caller has it."""
    a, b, x = np.broadcast_arrays(np.asarray(a, float), np.asarray(b, float), np.asarray(x, float))
    log_norm = _log_norm(a, b) if log_norm is None else log_norm
    mirror = x > (a + 1) / (a + b + 2)
    a, b, x = np.where(mirror, b, a), np.where(mirror, a, b), np.where(mirror, 1 - x, x)
    with np.errstate(divide="ignore"):  # log(0) at x = 0: the front factor is then 0
        log_front = log_norm + a * np.log(x) + b * np.log1p(-x)
    value = np.exp(log_front) * _beta_fraction(a, b, x) / a
    return np.clip(np.where(mirror, 1 - value, value), 0.0, 1.0)


def _beta_fraction(a: np.ndarray, b: np.ndarray, x: np.ndarray, eps: float = 1e-14) -> np.ndarray:
    tiny = 1e-300

    def floor(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < tiny, tiny, v)

    c = np.ones_like(x)
    d = 1 / floor(1 - (a + b) * x / (a + 1))
    h = d.copy()
    todo = np.arange(len(x))  # the elements not converged yet
    # Converges in O(sqrt(max(a, b))) steps on this side of the mirror; the cap is far above what counts reach.
    for m in range(1, 100_000):
        aa, bb, xx, dd, cc = a[todo], b[todo], x[todo], d[todo], c[todo]
        hh = h[todo]
        for step in (m * (bb - m) * xx / ((aa + 2 * m - 1) * (aa + 2 * m)),
                     -(aa + m) * (aa + bb + m) * xx / ((aa + 2 * m) * (aa + 2 * m + 1))):  # fmt: skip
            dd = 1 / floor(1 + step * dd)
            cc = floor(1 + step / cc)
            hh = hh * dd * cc
        d[todo], c[todo], h[todo] = dd, cc, hh
        todo = todo[np.abs(dd * cc - 1) >= eps]
        if not len(todo):
            break
    return h


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
