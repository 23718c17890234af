"""Confidence signals for a local answer: token log-probabilities, degenerate output, self-consistency.

The gate's score is on one scale, [0, 1], higher = surer: the geometric mean of the answer's token
probabilities (exp of the mean logprob) for a single sample, or the share of samples that agree for a vote.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from local_models.engine import Generation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Confidence:
    """What the gate reads about one answer."""

    mean_logprob: float
    min_logprob: float
    degenerate: str | None = None  # why the text is unusable: empty, repetition, ...
    agreement: float | None = None  # share of samples agreeing with this answer (self-consistency)
    samples: int = 1

    @property
    def score(self) -> float:
        """The gated score in [0, 1]: vote agreement when sampled, else the geometric-mean token probability."""
        if self.agreement is not None:
            return self.agreement
        return math.exp(self.mean_logprob)

    @property
    def min_prob(self) -> float:
        return math.exp(self.min_logprob)


def assess(generation: Generation) -> Confidence:
    """The signals of one generation."""
    logprobs = generation.token_logprobs
    mean = sum(logprobs) / len(logprobs) if logprobs else -math.inf
    return Confidence(mean, min(logprobs, default=-math.inf), degenerate_reason(generation.text))


def degenerate_reason(text: str, ngram: int = 4, max_repeat_share: float = 0.5) -> str | None:
    """Why a text is not a usable answer, or None: empty, or mostly a repeated phrase (a looping model)."""
    words = text.split()
    if not words:
        return "empty"
    if len(words) >= 2 * ngram:
        grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
        repeated = sum(count - 1 for count in Counter(grams).values())
        if repeated / len(grams) > max_repeat_share:
            return "repetition"
    longest_run = max((len(m.group(0)) for m in re.finditer(r"(.)\1*", text)), default=0)
    if longest_run >= 20 and longest_run > len(text) / 2:
        return "repetition"
    return None


def number_text(text: str, last: bool = False) -> str | None:
    """The first (or last) number written in a text, without thousands separators, or None."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    return found[-1 if last else 0].replace(",", "") if found else None


def squad_normalise(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalise_answer(text: str) -> str:
    """A comparable form of an answer: its last number when there is one (a worked answer ends with its result;
    a short one has one number), else the SQuAD normalisation."""
    value = number_text(text, last=True)
    if value is not None:
        return value.rstrip("0").rstrip(".") if "." in value else value
    return squad_normalise(text)


def vote(texts: Sequence[str], total: int | None = None) -> tuple[int, float]:
    """Self-consistency: the index of a representative of the most common normalised answer, and the share of
    `total` samples (default: those given) that agree with it. Empty answers never win a vote."""
    keys = [normalise_answer(t) for t in texts]
    counts = Counter(k for k in keys if k)
    if not counts:
        return 0, 0.0
    winner, count = counts.most_common(1)[0]
    return keys.index(winner), count / max(total or len(texts), 1)


def vote_decided(texts: Sequence[str], total: int) -> bool:
    """True when the samples still to come cannot change the winner (stop sampling early)."""
    counts = Counter(k for k in (normalise_answer(t) for t in texts) if k).most_common(2)
    if not counts:
        return False
    lead = counts[0][1] - (counts[1][1] if len(counts) > 1 else 0)
    return lead > total - len(texts)
