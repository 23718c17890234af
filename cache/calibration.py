"""Threshold calibration on labelled pairs: hit rate, false-hit rate and precision per cosine threshold, with 95%
Wilson score intervals, and the lowest threshold that meets a false-hit target."""

from __future__ import annotations

import json
import math
import platform
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class _Encoder(Protocol):
    model_id: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class Pair:
    """Two texts and whether they ask the same thing."""

    text_a: str
    text_b: str
    label: bool


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (well behaved near 0 and 1, unlike the normal one)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def load_pairs(path: Path, limit: int | None = None, seed: int = 0) -> list[Pair]:
    """Read [{text_a, text_b, label}, ...]; with `limit`, a seeded random sample."""
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError("expected a JSON list of {text_a, text_b, label}")
    pairs = [Pair(str(r["text_a"]), str(r["text_b"]), bool(int(r["label"]))) for r in rows]
    if limit is not None and limit < len(pairs):
        pairs = random.Random(seed).sample(pairs, limit)
    return pairs


def pair_similarities(pairs: Sequence[Pair], embedder: _Encoder) -> np.ndarray:
    """Cosine similarity of each pair (texts embedded once each)."""
    texts = sorted({p.text_a for p in pairs} | {p.text_b for p in pairs})
    position = {t: i for i, t in enumerate(texts)}
    vectors = embedder.encode(texts)
    a = vectors[[position[p.text_a] for p in pairs]]
    b = vectors[[position[p.text_b] for p in pairs]]
    return np.einsum("ij,ij->i", a, b)


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"count": k, "of": n, "rate": k / n if n else 0.0, "ci95": [lo, hi]}


def threshold_rows(similarity: np.ndarray, labels: np.ndarray, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """Per threshold: hit rate on duplicates, false-hit rate on non-duplicates, precision of hits."""
    rows = []
    n_dup, n_non = int(labels.sum()), int((~labels).sum())
    for t in thresholds:
        hit = similarity >= t
        tp, fp = int((hit & labels).sum()), int((hit & ~labels).sum())
        rows.append({"threshold": t, "hit_rate": _rate(tp, n_dup), "false_hit_rate": _rate(fp, n_non),
                     "precision": _rate(tp, tp + fp)})  # fmt: skip
    return rows


class _Scorer(Protocol):
    model_id: str

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray: ...


VERIFIER_THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99]


def _recommend(rows: list[dict[str, Any]], max_false_hit: float) -> dict[str, Any]:
    meets = [r["threshold"] for r in rows if r["false_hit_rate"]["rate"] <= max_false_hit]
    safe = [r["threshold"] for r in rows if r["false_hit_rate"]["ci95"][1] <= max_false_hit]
    return {"recommended_threshold": min(meets) if meets else None,
            "conservative_threshold": min(safe) if safe else None}  # fmt: skip


def calibrate(
    pairs: Sequence[Pair], embedder: _Encoder, thresholds: Sequence[float], max_false_hit: float,
    verifier: _Scorer | None = None, band_low: float = 0.8,
) -> dict[str, Any]:  # fmt: skip
    """The full report, with the recommended threshold (lowest meeting the target) and a conservative one
    (lowest whose interval's upper end meets it); with a verifier, the same for its probability threshold on the
    same pairs (served = cosine >= band_low and probability >= threshold)."""
    similarity = pair_similarities(pairs, embedder)
    labels = np.array([p.label for p in pairs], dtype=bool)
    rows = threshold_rows(similarity, labels, thresholds)
    report = {
        "embedder": embedder.model_id,
        "scale": "cosine similarity of L2-normalised embeddings, [0, 1], higher = closer",
        "pairs": len(pairs),
        "duplicates": int(labels.sum()),
        "max_false_hit": max_false_hit,
        **_recommend(rows, max_false_hit),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "rows": rows,
    }
    if verifier is not None:
        texts = [(p.text_a, p.text_b) for p in pairs]
        probability = np.concatenate([verifier.score(texts[i : i + 64]) for i in range(0, len(texts), 64)])
        verified = np.where(similarity >= band_low, probability, -1.0)  # below the band: never served
        vrows = threshold_rows(verified, labels, VERIFIER_THRESHOLDS)
        report["verifier"] = {"model": verifier.model_id, "band_low": band_low, "rows": vrows,
                              "scale": "calibrated probability that both texts ask the same thing, [0, 1]",
                              **_recommend(vrows, max_false_hit)}  # fmt: skip
    return report


def _fmt(rate: dict[str, Any]) -> str:
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:5.1f}% [{100 * lo:4.1f}-{100 * hi:4.1f}]"


def render_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = [
        f"pairs: {report['pairs']} ({report['duplicates']} duplicates); embedder: {report['embedder']}",
        f"threshold scale: {report['scale']}",
        f"{'threshold':>9}  {'hit rate (dups)':>22}  {'false-hit rate':>22}  {'precision':>22}",
    ]
    for r in report["rows"]:
        lines.append(f"{r['threshold']:>9.3f}  {_fmt(r['hit_rate']):>22}  {_fmt(r['false_hit_rate']):>22}  "
                     f"{_fmt(r['precision']):>22}")  # fmt: skip
    target = report["max_false_hit"]
    lines.append(f"recommended threshold for false-hit rate <= {100 * target:.1f}%: {report['recommended_threshold']}"
                 f" (conservative, upper 95% bound <= target: {report['conservative_threshold']})")  # fmt: skip
    v = report.get("verifier")
    if v:
        lines += ["", f"cosine >= {v['band_low']:.2f} and verifier {v['model']} probability >= threshold "
                  f"({v['scale']})",
                  f"{'threshold':>9}  {'hit rate (dups)':>22}  {'false-hit rate':>22}  {'precision':>22}"]  # fmt: skip
        for r in v["rows"]:
            lines.append(f"{r['threshold']:>9.3f}  {_fmt(r['hit_rate']):>22}  {_fmt(r['false_hit_rate']):>22}  "
                         f"{_fmt(r['precision']):>22}")  # fmt: skip
        lines.append(f"recommended verifier threshold for false-hit rate <= {100 * target:.1f}%: "
                     f"{v['recommended_threshold']} (conservative: {v['conservative_threshold']}); set it with "
                     "CACHECADE_CACHE_VERIFIER_THRESHOLD or PUT /admin/config verifier_threshold")  # fmt: skip
    return "\n".join(lines)
