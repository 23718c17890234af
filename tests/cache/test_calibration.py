"""Threshold calibration: Wilson intervals, per-threshold rates, the recommended threshold, pair loading."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from cache.calibration import Pair, calibrate, load_pairs, pair_similarities, render_table, threshold_rows, wilson


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (0, 10, (0.0, 0.27754)),
        (5, 10, (0.23659, 0.76341)),
        (10, 10, (0.72246, 1.0)),
        (1, 100, (0.00177, 0.05449)),
        (0, 0, (0.0, 1.0)),
    ],
)
def test_wilson_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_wilson_is_symmetric_and_contains_p() -> None:
    for k in range(0, 21):
        lo, hi = wilson(k, 20)
        assert 0.0 <= lo <= k / 20 <= hi <= 1.0
        mirror_lo, mirror_hi = wilson(20 - k, 20)
        assert lo == pytest.approx(1 - mirror_hi, abs=1e-12)
        assert hi == pytest.approx(1 - mirror_lo, abs=1e-12)


def test_threshold_rows() -> None:
    similarity = np.array([0.9, 0.8, 0.4, 0.7])
    labels = np.array([True, True, False, False])
    low, mid, high = threshold_rows(similarity, labels, [0.5, 0.75, 0.95])
    assert low["threshold"] == 0.5
    assert low["hit_rate"] == {"count": 2, "of": 2, "rate": 1.0, "ci95": list(wilson(2, 2))}
    assert low["false_hit_rate"]["count"] == 1 and low["false_hit_rate"]["rate"] == 0.5
    assert (low["precision"]["count"], low["precision"]["of"]) == (2, 3)
    assert low["precision"]["rate"] == pytest.approx(2 / 3)
    assert mid["false_hit_rate"]["rate"] == 0.0 and mid["precision"]["rate"] == 1.0
    assert mid["hit_rate"]["rate"] == 1.0
    assert high["hit_rate"]["count"] == 0 and high["false_hit_rate"]["count"] == 0
    assert high["precision"] == {"count": 0, "of": 0, "rate": 0.0, "ci95": [0.0, 1.0]}


def test_threshold_is_inclusive() -> None:
    rows = threshold_rows(np.array([0.5]), np.array([True]), [0.5])
    assert rows[0]["hit_rate"]["count"] == 1


class FakeEncoder:
    """Each pair lives in its own plane: text_a on one axis, text_b at the pair's cosine from it."""

    model_id = "fake-encoder"

    def __init__(self, sims: Sequence[float]) -> None:
        dim = 2 * len(sims)
        self.vectors: dict[str, np.ndarray] = {}
        for i, s in enumerate(sims):
            a, b = np.zeros(dim, dtype=np.float32), np.zeros(dim, dtype=np.float32)
            a[2 * i] = 1.0
            b[2 * i], b[2 * i + 1] = s, math.sqrt(1 - s * s)
            self.vectors[f"a{i}"], self.vectors[f"b{i}"] = a, b
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.stack([self.vectors[t] for t in texts])


SIMS = [0.95, 0.90, 0.70, 0.85, 0.60, 0.30]
LABELS = [True, True, True, False, False, False]


def make_pairs() -> list[Pair]:
    return [Pair(f"a{i}", f"b{i}", label) for i, label in enumerate(LABELS)]


def test_pair_similarities_embeds_each_text_once() -> None:
    encoder = FakeEncoder(SIMS)
    pairs = [*make_pairs(), Pair("a0", "b1", False)]
    sims = pair_similarities(pairs, encoder)
    np.testing.assert_allclose(sims, [*SIMS, 0.0], atol=1e-6)
    assert len(encoder.calls) == 1 and sorted(encoder.calls[0]) == sorted(encoder.vectors)


@pytest.mark.parametrize(
    "max_false_hit,recommended,conservative",
    [
        (0.0, 0.88, None),  # 0.88 is the lowest threshold with no false hit; no interval reaches 0
        (0.4, 0.8, None),  # 1/3 false hits at 0.8; wilson(0, 3) upper bound 0.56 > 0.4
        (0.6, 0.8, 0.88),  # wilson(0, 3) upper 0.56 <= 0.6 but wilson(1, 3) upper 0.79 is not
        (0.7, 0.5, 0.88),
        (1.0, 0.5, 0.5),
    ],
)
def test_calibrate_recommended_threshold(
    max_false_hit: float, recommended: float | None, conservative: float | None
) -> None:
    report = calibrate(make_pairs(), FakeEncoder(SIMS), [0.5, 0.8, 0.88, 0.92], max_false_hit)
    assert report["embedder"] == "fake-encoder"
    assert (report["pairs"], report["duplicates"], report["max_false_hit"]) == (6, 3, max_false_hit)
    assert report["recommended_threshold"] == recommended
    assert report["conservative_threshold"] == conservative
    by_t = {r["threshold"]: r for r in report["rows"]}
    assert [by_t[t]["false_hit_rate"]["count"] for t in (0.5, 0.8, 0.88, 0.92)] == [2, 1, 0, 0]
    assert [by_t[t]["hit_rate"]["count"] for t in (0.5, 0.8, 0.88, 0.92)] == [3, 2, 2, 1]
    table = render_table(report)
    assert f"recommended threshold for false-hit rate <= {100 * max_false_hit:.1f}%: {recommended}" in table
    assert len(table.splitlines()) == 3 + 4 + 1


def test_calibrate_no_threshold_meets_target() -> None:
    report = calibrate(make_pairs(), FakeEncoder(SIMS), [0.2, 0.5], 0.1)
    assert report["recommended_threshold"] is None and report["conservative_threshold"] is None


def write_pairs(path: Path, n: int = 10) -> Path:
    rows = [{"text_a": f"q{i}", "text_b": f"p{i}", "label": i % 2} for i in range(n)]
    rows[0]["label"] = "1"  # labels may be strings of 0/1
    path.write_text(json.dumps(rows))
    return path


def test_load_pairs_all(tmp_path: Path) -> None:
    pairs = load_pairs(write_pairs(tmp_path / "pairs.json"))
    assert len(pairs) == 10
    assert pairs[0] == Pair("q0", "p0", True)
    assert pairs[1] == Pair("q1", "p1", True)
    assert pairs[2] == Pair("q2", "p2", False)
    assert load_pairs(tmp_path / "pairs.json", limit=10) == pairs
    assert load_pairs(tmp_path / "pairs.json", limit=50) == pairs


def test_load_pairs_limit_and_seed(tmp_path: Path) -> None:
    path = write_pairs(tmp_path / "pairs.json")
    everything = load_pairs(path)
    sample = load_pairs(path, limit=4, seed=0)
    assert len(sample) == 4 and len(set(sample)) == 4
    assert all(p in everything for p in sample)
    assert load_pairs(path, limit=4, seed=0) == sample
    assert [p.text_a for p in sample] == ["q6", "q9", "q0", "q2"]  # random.Random(0).sample
    assert load_pairs(path, limit=4, seed=1) != sample


def test_load_pairs_rejects_non_list(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"text_a": "a", "text_b": "b", "label": 1}))
    with pytest.raises(ValueError, match="JSON list"):
        load_pairs(path)
