"""Calibrating the cascade's confidence gates on labelled questions (NQ-open, SVAMP, GSM8K).

Every local tier answers every question once (greedy, as the proxy asks them); each answer is graded against the
gold answers. Thresholds are then chosen the way the cascade uses them, in route order: the first tier's on all
questions, the next tier's on the questions the first one escalated, and so on. A tier's threshold is the lowest
observed score at which the answers its gate accepts reach the target precision (with a minimum number of them);
when no score qualifies the tier gets 1.0, which in practice never accepts.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from cache.calibration import wilson
from local_models.cascade import judge
from local_models.confidence import Confidence, assess, number_text, squad_normalise
from local_models.engine import Generation, Sampling
from local_models.prompts import Prompt

SYSTEM_PROMPT = "Answer with just the answer, no explanation."
MAX_TOKENS = 32
NEVER = 1.0  # the threshold of a tier no score qualifies (a score reaches 1.0 only when every token is certain)
Dataset = Literal["nq_open", "svamp", "gsm8k"]


@dataclass(frozen=True)
class QAItem:
    """A question and what counts as a right answer: gold aliases (text) or one gold number."""

    question: str
    answers: tuple[str, ...]
    dataset: Dataset
    number: float | None = None


# --- loading ------------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected a JSON list or JSON lines of question objects")
    return rows


def detect(path: Path, row: Mapping[str, Any]) -> Dataset:
    """Which data set a file holds, from its rows' shape (the file name only breaks ties)."""
    if "Body" in row and "Question" in row and "Answer" in row:
        return "svamp"
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return "gsm8k"
    if isinstance(answer, list) and "question" in row:
        return "nq_open"
    name = path.name.lower()
    for dataset in ("svamp", "gsm8k", "nq_open"):
        if dataset.replace("_", "") in name.replace("_", "").replace("-", ""):
            return dataset
    raise ValueError(f"{path.name}: rows are neither NQ-open, SVAMP nor GSM8K ({sorted(row)})")


def _item(row: Mapping[str, Any], dataset: Dataset) -> QAItem:
    if dataset == "svamp":
        number = float(row["Answer"])
        return QAItem(f"{str(row['Body']).strip()} {str(row['Question']).strip()}", (_fmt_number(number),), dataset,
                      number)  # fmt: skip
    if dataset == "gsm8k":
        number = float(str(row["answer"]).rsplit("####", 1)[1].strip().replace(",", ""))
        return QAItem(str(row["question"]).strip(), (_fmt_number(number),), dataset, number)
    return QAItem(str(row["question"]).strip(), tuple(str(a) for a in row["answer"]), dataset)


def _fmt_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else str(value)


def load_qa(path: Path, limit: int | None = None, seed: int = 0) -> list[QAItem]:
    """The questions of an NQ-open (.jsonl), SVAMP (.json list) or GSM8K (.jsonl) file; with `limit`, a seeded
    random sample of that many."""
    rows = _rows(path)
    dataset = detect(path, rows[0])
    try:
        items = [_item(r, dataset) for r in rows]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"{path.name}: a {dataset} row is malformed: {exc!r}") from exc
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


# --- grading ------------------------------------------------------------------------------------------------


def first_number(text: str) -> float | None:
    """The first number written in a text (thousands separators allowed), or None."""
    value = number_text(text)
    return float(value) if value is not None else None


def is_correct(answer: str, item: QAItem, tolerance: float = 1e-6) -> bool:
    """Numeric items: the answer's first number equals the gold one. Text items: some gold alias occurs in the
    normalised answer as whole words (so "one" does not match "someone")."""
    if item.number is not None:
        value = first_number(answer)
        return value is not None and abs(value - item.number) <= tolerance
    said = f" {squad_normalise(answer)} "
    return any(gold and f" {gold} " in said for gold in (squad_normalise(a) for a in item.answers))


# --- running the tiers ----------------------------------------------------------------------------------------


class Answerer(Protocol):
    """What a tier needs from an engine (LlamaEngine, or a fake in tests)."""

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]]) -> Prompt: ...

    def generate(self, prompt: Prompt, sampling: Sampling) -> Generation: ...


@dataclass(frozen=True)
class Record:
    """One tier's graded answer to one question, with what its gate reads."""

    text: str
    finish_reason: Literal["stop", "length"]
    confidence: Confidence
    correct: bool
    seconds: float = 0.0

    @property
    def score(self) -> float:
        return self.confidence.score

    def passes(self, threshold: float) -> bool:
        """Whether the proxy's gate (`judge`) accepts this answer at `threshold`."""
        return judge(Generation(self.text, [], self.finish_reason, 0, 0.0), self.confidence, threshold).accepted

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason, "score": round(self.score, 6),
                "degenerate": self.confidence.degenerate, "correct": self.correct,
                "seconds": round(self.seconds, 3)}  # fmt: skip


def messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat request every tier (and the proxy, in the bench) gets for a question."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def run_tier(
    engine: Answerer,
    items: Sequence[QAItem],
    max_tokens: int = MAX_TOKENS,
    system: str = SYSTEM_PROMPT,
    progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Greedy answers of one tier to every question, graded."""
    records = []
    for done, item in enumerate(items, 1):
        generation = engine.generate(engine.chat_prompt(messages(item.question, system)), Sampling(max_tokens))
        records.append(Record(generation.text.strip(), generation.finish_reason, assess(generation),
                              is_correct(generation.text, item), generation.seconds))  # fmt: skip
        if progress is not None:
            progress(done)
    return records


# --- choosing thresholds --------------------------------------------------------------------------------------


def choose_threshold(records: Sequence[Record], target: float, min_accepted: int) -> float | None:
    """The lowest observed score whose accepted answers (at least `min_accepted`) are right at least `target` of
    the time; None when no score qualifies. Scores are walked from the top, so each prefix is what a threshold at
    its last score accepts."""
    ranked = sorted((r for r in records if r.passes(0.0)), key=lambda r: r.score, reverse=True)
    best, correct = None, 0
    for n, record in enumerate(ranked, 1):
        correct += record.correct
        boundary = n == len(ranked) or ranked[n].score < record.score  # ties are accepted together
        if boundary and n >= min_accepted and correct >= target * n:
            best = record.score
    return best


def _floor(value: float, digits: int = 4) -> float:
    # Rounded down, so the applied threshold still accepts the answer that set it.
    return math.floor(value * 10**digits) / 10**digits


def rate(k: int, n: int) -> dict[str, Any]:
    """A proportion with its 95% Wilson interval."""
    lo, hi = wilson(k, n)
    return {"count": k, "of": n, "rate": k / n if n else 0.0, "ci95": [round(lo, 4), round(hi, 4)]}


def _tier_row(name: str, threshold: float | None, reached: list[Record], every: list[Record]) -> dict[str, Any]:
    applied = NEVER if threshold is None else _floor(threshold)
    accepted = [r for r in reached if r.passes(applied)]
    right = sum(r.correct for r in accepted)
    return {"tier": name, "threshold": applied, "qualified": threshold is not None, "reached": len(reached),
            "accepted": rate(len(accepted), len(reached)), "accuracy": rate(right, len(accepted)),
            "escalated": rate(len(reached) - len(accepted), len(reached)),
            "ungated_accuracy": rate(sum(r.correct for r in every), len(every))}  # fmt: skip


def calibrate(
    items: Sequence[QAItem], records: Mapping[str, Sequence[Record]], target: float, min_accepted: int = 10
) -> dict[str, Any]:
    """Thresholds chosen tier by tier in route order (`records` in that order, one Record per item), with the
    accepted share and accuracy per tier and for the whole local cascade."""
    remaining = list(range(len(items)))
    served: dict[int, Record] = {}
    tiers = []
    for name, answers in records.items():
        reached = [answers[i] for i in remaining]
        row = _tier_row(name, choose_threshold(reached, target, min_accepted), reached, list(answers))
        tiers.append(row)
        served |= {i: answers[i] for i in remaining if answers[i].passes(row["threshold"])}
        remaining = [i for i in remaining if i not in served]
    return {"target_precision": target, "min_accepted": min_accepted, "questions": len(items),
            "datasets": dict(Counter(item.dataset for item in items)), "tiers": tiers,
            "cascade": _cascade_row(items, served), "thresholds": {t["tier"]: t["threshold"] for t in tiers},
            "by_dataset": _by_dataset(items, served)}  # fmt: skip


def _cascade_row(items: Sequence[QAItem], served: Mapping[int, Record]) -> dict[str, Any]:
    right = sum(r.correct for r in served.values())
    return {"accepted": rate(len(served), len(items)), "accuracy": rate(right, len(served)),
            "escalated": rate(len(items) - len(served), len(items))}  # fmt: skip


def _by_dataset(items: Sequence[QAItem], served: Mapping[int, Record]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for dataset in sorted({item.dataset for item in items}):
        indices = [i for i, item in enumerate(items) if item.dataset == dataset]
        out[dataset] = _cascade_row([items[i] for i in indices], {i: served[i] for i in indices if i in served})
    return out


# --- rendering ------------------------------------------------------------------------------------------------


def _pct(r: dict[str, Any]) -> str:
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:5.1f}% [{100 * lo:4.1f}-{100 * hi:4.1f}] ({r['count']}/{r['of']})"


def env_line(thresholds: Mapping[str, float]) -> str:
    """The setting that applies the thresholds to `cachecade serve`."""
    return f"CACHECADE_CASCADE_THRESHOLDS='{json.dumps(dict(thresholds), separators=(',', ':'))}'"


def render_table(report: Mapping[str, Any]) -> str:
    """The report as plain text, ending with the env line."""
    sets = ", ".join(f"{k}: {v}" for k, v in report["datasets"].items())
    lines = [f"questions: {report['questions']} ({sets}); target precision {report['target_precision']:.2f}, "
             f"at least {report['min_accepted']} accepted per tier; scores: geometric-mean token probability",
             f"{'tier':<8} {'threshold':>9} {'reached':>7}  {'accepted share':<30} {'accepted accuracy':<30} "
             f"{'ungated accuracy':<30}"]  # fmt: skip
    for t in report["tiers"]:
        mark = "" if t["qualified"] else "  (none qualifies: never accepts)"
        lines.append(f"{t['tier']:<8} {t['threshold']:>9.4f} {t['reached']:>7}  {_pct(t['accepted']):<30} "
                     f"{_pct(t['accuracy']):<30} {_pct(t['ungated_accuracy']):<30}{mark}")  # fmt: skip
    for name, row in [("cascade", report["cascade"]), *report["by_dataset"].items()]:
        lines.append(f"{name:<8} {'local':>9} {row['accepted']['of']:>7}  {_pct(row['accepted']):<30} "
                     f"{_pct(row['accuracy']):<30} escalated upstream {_pct(row['escalated'])}")  # fmt: skip
    lines.append(env_line(report["thresholds"]))
    return "\n".join(lines)


def progress_printer(tier: str, total: int, out: Callable[[str], None], every: int = 25) -> Callable[[int], None]:
    """A progress callback that reports every `every` questions with the elapsed time."""
    started = time.monotonic()

    def report(done: int) -> None:
        if done % every == 0 or done == total:
            out(f"{tier}: {done}/{total} questions, {time.monotonic() - started:.0f}s")

    return report
