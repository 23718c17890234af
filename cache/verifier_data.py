"""Pairs for the cache verifier: labelled pairs read from files, and pairs made from single questions.

Hard negatives keep most of a question's words and change what it asks: two words swapped around a direction
("from Paris to Rome" / "from Rome to Paris"), a number changed, a negation added, a unit changed. Hard positives
change its form only: casing, punctuation, spacing, contractions, polite wrappers, and a reorder that keeps the
meaning ("between A and B" / "between B and A", a trailing phrase moved to the front). A cosine threshold hits
most hard negatives and misses many hard positives; the verifier learns both from these.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """Two texts and whether they ask the same thing (1) or not (0)."""

    a: str
    b: str
    label: int
    source: str = "file"


def read_pairs(path: Path) -> list[Pair]:
    """Labelled pairs: a JSON list or JSON lines of {text_a, text_b, label} (the QQP format), or an STS-B CSV
    (tab-separated, score 0-5: >= 4 counts as the same question, <= 1.5 as another; the rest is left out)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".csv":
        return list(_stsb(text))
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                     if line.strip()]  # fmt: skip
    return [Pair(str(r["text_a"]), str(r["text_b"]), int(r["label"])) for r in rows]


def _stsb(text: str) -> Iterator[Pair]:
    for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE):
        if len(row) >= 7:
            score = float(row[4])
            if score >= 4.0 or score <= 1.5:
                yield Pair(row[5], row[6], int(score >= 4.0), "stsb")


def split_of(pair: Pair, seed: int, validation_share: float = 0.15) -> str:
    """'train' or 'validation', from a hash of the pair's texts (stable across runs and file orders)."""
    digest = hashlib.sha256(f"{seed}:{min(pair.a, pair.b)}\x00{max(pair.a, pair.b)}".encode()).digest()
    return "validation" if digest[0] / 256 < validation_share else "train"


_DIRECTIONAL = re.compile(r"\b(from|between)?\s*([A-Za-z][\w.-]*) (to|than|into|vs\.?|versus|over|against|beat|"
                          r"beats|defeat|defeats|before|after) ([A-Za-z][\w.-]*)\b")  # fmt: skip
_CONJUNCT = re.compile(r"\b(between|both) ([A-Za-z][\w.-]*) and ([A-Za-z][\w.-]*)\b")
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")
_AUX = re.compile(r"^(is|are|was|were|can|could|do|does|did|should|will|would|has|have)\b", re.IGNORECASE)
_TRAILING = re.compile(r"^(.*\w)\s+((?:in|on|at|during|for|after|before) [\w ]{2,30}?)\s*\?$")
_UNITS = [("km", "miles"), ("kg", "pounds"), ("Celsius", "Fahrenheit"), ("dollars", "euros"), ("hours", "minutes"),
          ("meters", "feet"), ("days", "weeks"), ("years", "months")]  # fmt: skip
_CONTRACTIONS = [("what is", "what's"), ("do not", "don't"), ("does not", "doesn't"), ("i am", "i'm"),
                 ("is not", "isn't"), ("can not", "can't"), ("cannot", "can't"), ("it is", "it's"),
                 ("who is", "who's"), ("where is", "where's"), ("how is", "how's"),
                 ("there is", "there's")]  # fmt: skip
_WRAPPERS = ["please tell me {q}", "can you tell me {q}", "{Q} please", "I'd like to know: {q}", "quick question: {q}",
             "hey, {q}", "Please, {q}", "could you tell me {q}"]  # fmt: skip
_STOP = {"what", "which", "when", "where", "does", "have", "with", "that", "this", "there", "their", "about", "from",
         "your", "into", "should", "would", "could", "best", "good", "some", "much", "many", "more"}  # fmt: skip


def word_swap(q: str, rng: random.Random) -> str | None:
    """Swap two words around a direction ('from A to B' -> 'from B to A'), else two content words: same words,
    another question."""
    match = _DIRECTIONAL.search(q)
    if match and match[2].lower() != match[4].lower():
        start, end = match.span(2)[0], match.span(4)[1]
        return q[:start] + f"{match[4]} {match[3]} {match[2]}" + q[end:]
    words = q.split()
    spots = [i for i, w in enumerate(words) if len(w.strip("?,.!")) >= 4 and w.strip("?,.!").lower() not in _STOP]
    if len(spots) < 2:
        return None
    i, j = rng.sample(spots, 2)
    wi, wj = words[i].strip("?,.!"), words[j].strip("?,.!")
    if wi.lower() == wj.lower():
        return None
    words[i], words[j] = words[i].replace(wi, wj), words[j].replace(wj, wi)
    return " ".join(words)


def reorder_same_meaning(q: str, rng: random.Random) -> str | None:
    """A reorder that keeps the meaning: 'between A and B' -> 'between B and A', or a trailing 'in 2010' moved
    to the front."""
    match = _CONJUNCT.search(q)
    if match and match[2].lower() != match[3].lower():
        return q[: match.start()] + f"{match[1]} {match[3]} and {match[2]}" + q[match.end() :]
    match = _TRAILING.match(q)
    if match:
        head = match[1]
        return f"{match[2][0].upper()}{match[2][1:]}, {head[0].lower()}{head[1:]}?"
    return None


def number_change(q: str, rng: random.Random) -> str | None:
    match = _NUMBER.search(q)
    if not match:
        return None
    value = float(match[0])
    other = value + rng.choice([1, 2, 3, 5, 10, 100]) * rng.choice([-1, 1]) if value > 10 else value + rng.randint(1, 9)
    text = str(int(other)) if match[1] is None else f"{other:.{len(match[1]) - 1}f}"
    return q[: match.start()] + text + q[match.end() :] if text != match[0] else None


def negation(q: str, rng: random.Random) -> str | None:
    match = _AUX.match(q)
    if not match:
        return None
    return q[: match.end()] + " not" + q[match.end() :]


def unit_change(q: str, rng: random.Random) -> str | None:
    for one, other in _UNITS:
        for a, b in ((one, other), (other, one)):
            if re.search(rf"\b{a}\b", q):
                return re.sub(rf"\b{a}\b", b, q, count=1)
    return None


def surface_variant(q: str, rng: random.Random) -> str:
    """The same question in another form: casing, punctuation, spacing, contractions, a polite wrapper."""
    out = q
    for step in rng.sample(["case", "punct", "space", "contract", "wrap"], k=rng.randint(1, 3)):
        if step == "case":
            out = out.lower() if rng.random() < 0.8 else out.upper()
        elif step == "punct":
            out = out.rstrip("?.! ") if out.rstrip().endswith(("?", ".", "!")) else out + "?"
        elif step == "space":
            out = "  ".join(out.split()) if rng.random() < 0.5 else f" {out} "
        elif step == "contract":
            for long, short in rng.sample(_CONTRACTIONS, len(_CONTRACTIONS)):
                pattern = re.compile(rf"\b{re.escape(long)}\b", re.IGNORECASE)
                if pattern.search(out):
                    out = pattern.sub(short, out, count=1)
                    break
                back = re.compile(rf"\b{re.escape(short)}\b", re.IGNORECASE)
                if back.search(out):
                    out = back.sub(long, out, count=1)
                    break
        else:
            body = out.strip()
            out = rng.choice(_WRAPPERS).format(q=body[:1].lower() + body[1:], Q=body)
    return out


NEGATIVES: dict[str, Callable[[str, random.Random], str | None]] = {
    "word-swap": word_swap, "number": number_change, "negation": negation, "unit": unit_change,
}  # fmt: skip


def generated_pairs(questions: Iterable[str], seed: int, per_question: float = 1.0) -> list[Pair]:
    """Hard negatives and positives made from questions (about `per_question` pairs of each kind per question
    that the kind applies to)."""
    rng = random.Random(seed)
    out: list[Pair] = []
    for q in questions:
        q = " ".join(q.split())
        if len(q) < 12 or rng.random() > per_question:
            continue
        for kind, make in NEGATIVES.items():
            other = make(q, rng)
            if other and other != q:
                out.append(Pair(q, other, 0, kind))
        same = reorder_same_meaning(q, rng)
        if same and same != q:
            out.append(Pair(q, same, 1, "reorder"))
        variant = surface_variant(q, rng)
        if variant.strip() != q:
            out.append(Pair(q, variant, 1, "surface"))
    return out
